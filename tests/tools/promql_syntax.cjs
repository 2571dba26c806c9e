// Checks PromQL expressions against Prometheus's own grammar (the npm package
// @prometheus-io/lezer-promql, whose folder is the first argument). Reads one expression per line
// of stdin, each a JSON string; prints one line per expression: "ok", or "error at N" with the
// offset of the first syntax error. Used by tests/tests/helm_chart.rs for the chart's alert rules.
const { parser } = require(process.argv[2]);
const lines = require('fs').readFileSync(0, 'utf8').split('\n').filter((l) => l.trim() !== '');
for (const line of lines) {
  const tree = parser.parse(JSON.parse(line));
  let at = null;
  tree.iterate({ enter: (node) => { if (at === null && node.type.isError) at = node.from; } });
  console.log(at === null ? 'ok' : `error at ${at}`);
}
