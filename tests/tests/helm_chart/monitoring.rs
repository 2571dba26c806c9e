//! What the chart gives monitoring: the ServiceMonitor's shape, the Grafana dashboard's and the
//! PrometheusRule's expressions (parsed with Prometheus's own PromQL grammar, reading only metrics
//! the servers export, and only this release's coordinator). Called from `helm_chart.rs`'s
//! deployment-contract test for each rendered values set.

use super::*;

/// The ServiceMonitor (a CRD kubernetes-validate cannot check): prometheus-operator's v1 shape,
/// scraping the `metrics` port of exactly the coordinator and worker Services.
pub(super) fn service_monitor_scrapes_both_components(r: &Rendered) {
    let sm = r.all("ServiceMonitor")[0];
    assert_eq!(sm.get("apiVersion"), Some("monitoring.coreos.com/v1"));
    assert_eq!(sm.get("metadata.labels.release"), Some("kube-prometheus-stack"));
    assert_eq!(sm.get("spec.namespaceSelector.matchNames[0]"), Some(NAMESPACE));
    assert_eq!(sm.len("spec.endpoints"), 1);
    assert_eq!(sm.get("spec.endpoints[0].port"), Some("metrics"));
    assert_eq!(sm.get("spec.endpoints[0].path"), Some("/metrics"));
    assert_eq!(sm.get("spec.endpoints[0].interval"), Some("15s"));
    let known = ["port", "path", "scheme", "interval", "scrapeTimeout"];
    for (key, _) in sm.under("spec.endpoints[0]") {
        assert!(known.contains(&key.as_str()), "unexpected endpoint field {key}");
    }
    assert_eq!(sm.get("spec.selector.matchExpressions[0].key"), Some("app.kubernetes.io/component"));
    assert_eq!(sm.get("spec.selector.matchExpressions[0].operator"), Some("In"));
    let components: Vec<&str> =
        (0..sm.len("spec.selector.matchExpressions[0].values")).map(|i| sm.req(&format!("spec.selector.matchExpressions[0].values[{i}]"))).collect();
    let match_labels = map(sm, "spec.selector.matchLabels");
    let scraped: Vec<String> = r
        .all("Service")
        .into_iter()
        .filter(|s| {
            let labels = map(s, "metadata.labels");
            match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
                && components.contains(&labels.get("app.kubernetes.io/component").map(String::as_str).unwrap_or(""))
        })
        .map(|s| {
            assert!((0..s.len("spec.ports")).any(|i| s.get(&format!("spec.ports[{i}].name")) == Some("metrics")), "{} has no metrics port", s.id());
            s.req("metadata.labels.app.kubernetes.io/component").to_string()
        })
        .collect();
    assert_eq!(scraped, ["coordinator", "worker"], "the ServiceMonitor selects one Service of each component");
}

/// The Grafana dashboard ConfigMap: the sidecar's label, valid JSON, and every metric it queries
/// one that the servers export (named in their source), covering the planner's prediction.
pub(super) fn grafana_dashboard_shows_the_metrics_the_servers_export(r: &Rendered) {
    let cm = r.one("ConfigMap", "dashboard");
    assert_eq!(cm.get("metadata.labels.grafana_dashboard"), Some("1"));
    let dashboard: serde_json::Value = serde_json::from_str(cm.req("data.tessera.json")).expect("the dashboard is JSON");
    let sources = metric_sources();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queried.extend(exported_metrics_in(target["expr"].as_str().expect("expr"), &sources, "the dashboard"));
        }
    }
    for needed in [
        "tessera_queue_depth",
        "tessera_step_duration_seconds",
        "tessera_tokens_total",
        "tessera_worker_step_duration_seconds",
        "tessera_collective_bytes_total",
        "tessera_job_predicted_seconds",
        "tessera_job_run_seconds",
    ] {
        assert!(queried.contains(needed), "the dashboard does not show {needed}");
    }
}

/// The source of the servers' metrics, where each metric's name is written once.
fn metric_sources() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    ["coordinator/src/server/metrics.rs", "shard-worker/src/server/metrics.rs", "telemetry/src/metrics.rs"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(root.join(f)).ok())
        .collect()
}

/// The `tessera_` metrics a PromQL expression names (a histogram's by its name), each asserted
/// to be one the servers export (`sources`, from [`metric_sources`]); `what` says who queries.
fn exported_metrics_in(expr: &str, sources: &str, what: &str) -> Vec<String> {
    let mut named = Vec::new();
    for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("tessera_")) {
        let metric = ["_bucket", "_sum", "_count"].iter().fold(word, |m, suffix| m.strip_suffix(suffix).unwrap_or(m));
        assert!(sources.contains(&format!("\"{metric}\"")), "{what} queries {metric}, which no server exports");
        named.push(metric.to_string());
    }
    named
}

/// Each PromQL expression checked against Prometheus's own grammar (`tools/promql_syntax.cjs`
/// with node and the npm package @prometheus-io/lezer-promql, whose folder
/// TESSERA_PROMQL_GRAMMAR names): `None` for one that parses, else where it stops parsing.
/// `None` for the whole list (after saying why) when the tools are missing outside CI.
pub(super) fn promql_syntax_errors(exprs: &[String]) -> Option<Vec<Option<String>>> {
    let grammar = std::env::var_os("TESSERA_PROMQL_GRAMMAR").map(PathBuf::from).filter(|p| p.join("package.json").is_file());
    let (Some(node), Some(grammar)) = (find_tool("TESSERA_NODE", "node"), grammar) else {
        let hint = "npm install --prefix ~/.cache/tessera-tools @prometheus-io/lezer-promql; TESSERA_PROMQL_GRAMMAR=~/.cache/tessera-tools/node_modules/@prometheus-io/lezer-promql";
        assert!(!in_ci(), "CI=true requires the PromQL syntax check: {hint}");
        eprintln!("skipping the PromQL syntax check: node or the grammar is missing ({hint})");
        return None;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/promql_syntax.cjs");
    let mut child = Command::new(node)
        .arg(script)
        .arg(grammar)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("node runs");
    let input: String = exprs.iter().map(|e| format!("{}\n", serde_json::Value::from(e.as_str()))).collect();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the PromQL syntax check failed: {}", text(&out));
    let answers: Vec<Option<String>> = String::from_utf8(out.stdout).unwrap().lines().map(|l| (l != "ok").then(|| l.to_string())).collect();
    assert_eq!(answers.len(), exprs.len(), "one answer per expression");
    Some(answers)
}

/// The PrometheusRule (a CRD kubernetes-validate cannot check): prometheus-operator's v1 shape,
/// every alert with a severity, a summary and a description, every series it reads this
/// release's coordinator's, every metric one the servers export, the thresholds the release's
/// own settings, every expression valid PromQL; the store's alerts only with a store. Returns
/// the alerts' names.
pub(super) fn prometheus_rule_alerts_on_what_the_servers_export(r: &Rendered, queue_fraction: &str) -> Vec<String> {
    let rules = r.all("PrometheusRule");
    assert_eq!(rules.len(), 1, "{}", r.name);
    let pr = rules[0];
    assert_eq!(pr.get("apiVersion"), Some("monitoring.coreos.com/v1"));
    assert_eq!(pr.get("metadata.namespace"), Some(NAMESPACE));
    let coordinator = r.one("Deployment", "coordinator");
    let env = r.container_env(coordinator, C0);
    let selector = format!("namespace=\"{NAMESPACE}\", service=\"{}\"", r.one("Service", "coordinator").req("metadata.name"));
    let sources = metric_sources();
    let (mut names, mut exprs) = (Vec::new(), Vec::new());
    for g in 0..pr.len("spec.groups") {
        for i in 0..pr.len(&format!("spec.groups[{g}].rules")) {
            let rule = |key: &str| pr.get(&format!("spec.groups[{g}].rules[{i}].{key}"));
            let name = rule("alert").expect("an alert rule").to_string();
            let expr = rule("expr").expect("an expression").to_string();
            assert!(matches!(rule("labels.severity"), Some("critical" | "warning" | "info")), "{name}: severity");
            assert!(
                rule("annotations.summary").is_some_and(|t| t.len() > 20) && rule("annotations.description").is_some_and(|t| t.len() > 20),
                "{name}: words for the person paged"
            );
            if let Some(d) = rule("for") {
                assert!(d.len() > 1 && d[..d.len() - 1].parse::<u32>().is_ok() && d.ends_with(['s', 'm', 'h']), "{name}: for {d}");
            }
            assert!(
                !expr.is_empty() && expr.matches('{').count() == expr.matches(&selector).count(),
                "{name}: a series not of this release's coordinator: {expr}"
            );
            assert!(!names.contains(&name), "{name} twice");
            exported_metrics_in(&expr, &sources, &name);
            names.push(name);
            exprs.push(expr);
        }
    }
    let expr_of = |name: &str| exprs[names.iter().position(|n| n == name).unwrap_or_else(|| panic!("{}: no {name}", r.name))].as_str();
    assert!(expr_of("TesseraQueueNearlyFull").ends_with(&format!("> {queue_fraction} * {}", env["TESSERA_MAX_QUEUE"])), "the queue's own limit");
    assert!(expr_of("TesseraWorkersMissing").ends_with(&format!("< {}", r.one("StatefulSet", "worker").req("spec.replicas"))), "the release's workers");
    let store = env.contains_key("TESSERA_STATE");
    assert_eq!(names.iter().any(|n| n.contains("StoreOwner")), store, "the store's alerts with a store only");
    if let Some(errors) = promql_syntax_errors(&exprs) {
        for ((name, expr), error) in names.iter().zip(&exprs).zip(errors) {
            assert!(error.is_none(), "{name}: {expr}: {error:?}");
        }
    }
    names
}
