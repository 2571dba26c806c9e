//! The chart's TLS (`tls.*`): what each values set issues, mounts and points the processes at;
//! and, with the processes' own TLS code and a real etcd, that the certificates Helm generates
//! let the coordinator reach a worker and etcd by the names they are dialled at, and refuse
//! anyone the release's CA did not sign.

use super::*;
use std::net::TcpListener;
use std::time::{Duration, Instant};
use tessera_cluster::membership::{EtcdMembership, Heartbeat};
use tessera_cluster::tls::{EtcdTlsArgs, TlsArgs};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Who issued a rendered release's certificates.
#[derive(Debug, PartialEq)]
pub(super) enum Issuer {
    Off,
    Helm,
    CertManager,
}

/// How `r` does TLS: off when the coordinator is given no certificate.
pub(super) fn issuer(r: &Rendered) -> Issuer {
    let env = r.container_env(r.one("Deployment", "coordinator"), C0);
    match (env.contains_key("TESSERA_TLS_CERT"), r.all("Certificate").is_empty()) {
        (false, _) => Issuer::Off,
        (true, true) => Issuer::Helm,
        (true, false) => Issuer::CertManager,
    }
}

/// A probe is an HTTP GET of `path` on the named port `port` (and nothing else).
pub(super) fn assert_http_probe(doc: &FlatDoc, probe: &str, path: &str, port: &str) {
    let p = format!("{C0}.{probe}");
    assert_eq!(doc.get(&format!("{p}.httpGet.path")), Some(path), "{} {probe}", doc.id());
    assert_eq!(doc.get(&format!("{p}.httpGet.port")), Some(port), "{} {probe}", doc.id());
    for other in ["grpc", "tcpSocket", "exec"] {
        assert!(!doc.has(&format!("{p}.{other}")), "{} {probe} has {other}", doc.id());
    }
}

/// The Secret a pod's `tls` volume holds and the folder its container mounts it at (read-only).
fn tls_mount(doc: &FlatDoc) -> Option<(&str, &str)> {
    let v = (0..doc.len(&format!("{POD}.volumes"))).find(|i| doc.get(&format!("{POD}.volumes[{i}].name")) == Some("tls"))?;
    let m = (0..doc.len(&format!("{C0}.volumeMounts")))
        .find(|i| doc.get(&format!("{C0}.volumeMounts[{i}].name")) == Some("tls"))
        .unwrap_or_else(|| panic!("{}: a tls volume nobody mounts", doc.id()));
    assert_eq!(doc.get(&format!("{C0}.volumeMounts[{m}].readOnly")), Some("true"), "{}", doc.id());
    Some((doc.req(&format!("{POD}.volumes[{v}].secret.secretName")), doc.req(&format!("{C0}.volumeMounts[{m}].mountPath"))))
}

/// Whether `names` (a certificate's DNS names) cover `host`, a `*.` entry standing for one label.
fn covers(names: &[&str], host: &str) -> bool {
    names.iter().any(|n| match n.strip_prefix("*.") {
        Some(rest) => host.split_once('.').is_some_and(|(_, tail)| tail == rest),
        None => *n == host,
    })
}

/// Everything TLS in one rendered release: off, nothing of it; on, every process points at a
/// certificate of its own mounted from the Secret the chart (or cert-manager) fills, etcd serves
/// clients and peers TLS only with client certificates, and each certificate is for the names
/// its process is dialled at.
pub(super) fn check_tls(r: &Rendered) {
    let coord = r.one("Deployment", "coordinator");
    let worker = r.one("StatefulSet", "worker");
    let etcd = r.find("StatefulSet", "etcd");
    let env = r.container_env(coord, C0);
    let wenv = r.container_env(worker, C0);
    let tls_docs: Vec<&FlatDoc> = r.docs.iter().filter(|d| d.get("metadata.labels.app.kubernetes.io/component") == Some("tls")).collect();
    let issuer = issuer(r);
    if issuer == Issuer::Off {
        assert!(tls_docs.is_empty(), "{}: TLS off, yet {:?}", r.name, tls_docs.iter().map(|d| d.id()).collect::<Vec<_>>());
        for (doc, env) in [(coord, &env), (worker, &wenv)] {
            assert!(tls_mount(doc).is_none(), "{}", doc.id());
            assert!(!env.keys().any(|k| k.starts_with("TESSERA_TLS_") || k.starts_with("TESSERA_ETCD_C") || k == "TESSERA_ETCD_KEY"), "{}: {env:?}", doc.id());
        }
        if let Some(etcd) = etcd {
            assert!(
                tls_mount(etcd).is_none() && (0..etcd.len(&format!("{C0}.env"))).all(|i| etcd.get(&format!("{C0}.env[{i}].name")) != Some("ETCD_CERT_FILE"))
            );
        }
        return;
    }

    // The Secret each component mounts is one the release fills, for that component.
    let filled = |secret: &str| -> &FlatDoc {
        match issuer {
            Issuer::Helm => r.named("Secret", secret),
            _ => r
                .all("Certificate")
                .into_iter()
                .find(|c| c.get("spec.secretName") == Some(secret))
                .unwrap_or_else(|| panic!("{}: no Certificate fills {secret}", r.name)),
        }
    };
    let mut secrets = Vec::new();
    for (doc, env, component) in [(coord, &env, "coordinator"), (worker, &wenv, "worker")] {
        let (secret, dir) = tls_mount(doc).unwrap_or_else(|| panic!("{}: TLS on but no tls volume", doc.id()));
        for (var, file) in [("TESSERA_TLS_CERT", "tls.crt"), ("TESSERA_TLS_KEY", "tls.key"), ("TESSERA_TLS_CA", "ca.crt")] {
            assert_eq!(env.get(var), Some(&format!("{dir}/{file}")), "{}: {var}", doc.id());
        }
        if etcd.is_some() {
            // The same certificate is the process's etcd client certificate.
            for (var, same) in [("TESSERA_ETCD_CA", "TESSERA_TLS_CA"), ("TESSERA_ETCD_CERT", "TESSERA_TLS_CERT"), ("TESSERA_ETCD_KEY", "TESSERA_TLS_KEY")] {
                assert_eq!(env.get(var), env.get(same), "{}: {var}", doc.id());
            }
            assert!(env["TESSERA_ETCD_ENDPOINTS"].starts_with("https://"), "{}", env["TESSERA_ETCD_ENDPOINTS"]);
        }
        assert_eq!(filled(secret).get("metadata.annotations.tessera.io/tls-for"), Some(component), "{secret}");
        secrets.push(secret);
    }
    if let Some(etcd) = etcd {
        let (secret, dir) = tls_mount(etcd).expect("etcd's tls volume");
        let var = |name: &str| etcd_env(etcd, name).to_string();
        for (name, file) in [("CERT_FILE", "tls.crt"), ("KEY_FILE", "tls.key"), ("TRUSTED_CA_FILE", "ca.crt")] {
            assert_eq!(var(&format!("ETCD_{name}")), format!("{dir}/{file}"));
            assert_eq!(var(&format!("ETCD_PEER_{name}")), format!("{dir}/{file}"));
        }
        assert_eq!(var("ETCD_CLIENT_CERT_AUTH"), "true");
        assert_eq!(var("ETCD_PEER_CLIENT_CERT_AUTH"), "true");
        for name in ["ETCD_LISTEN_CLIENT_URLS", "ETCD_ADVERTISE_CLIENT_URLS", "ETCD_LISTEN_PEER_URLS", "ETCD_INITIAL_ADVERTISE_PEER_URLS"] {
            assert!(var(name).starts_with("https://"), "{name}={}", var(name));
        }
        assert!(var("ETCD_INITIAL_CLUSTER").split(',').all(|m| m.contains("=https://")), "{}", var("ETCD_INITIAL_CLUSTER"));
        // The readiness probe asks the plain metrics listener, not the client port.
        assert_http_probe(etcd, "readinessProbe", "/health", "metrics");
        assert_eq!(port_of(&var("ETCD_LISTEN_METRICS_URLS")), container_port(etcd, "metrics"));
        assert!(var("ETCD_LISTEN_METRICS_URLS").starts_with("http://"));
        assert_eq!(filled(secret).get("metadata.annotations.tessera.io/tls-for"), Some("etcd"));
        secrets.push(secret);
    }
    secrets.sort();
    secrets.dedup();
    assert_eq!(secrets.len(), if etcd.is_some() { 3 } else { 2 }, "{}: one certificate per component", r.name);

    match issuer {
        Issuer::Helm => {
            // One CA: every certificate's ca.crt is the CA Secret's certificate.
            let ca = r.all("Secret").into_iter().find(|s| s.req("metadata.name").ends_with("-tls-ca")).expect("the CA Secret");
            for s in &secrets {
                let doc = r.named("Secret", s);
                assert_eq!(doc.get("type"), Some("kubernetes.io/tls"));
                assert_eq!(doc.get("data.ca.crt"), ca.get("data.tls.crt"), "{s}");
                assert!(!doc.req("data.tls.crt").is_empty() && !doc.req("data.tls.key").is_empty());
            }
        }
        Issuer::CertManager => {
            let advertise = wenv["TESSERA_WORKER_ADVERTISE_HOST"].replace("$(POD_NAME)", "tessera-worker-7");
            for s in &secrets {
                let cert = filled(s);
                let names: Vec<&str> = (0..cert.len("spec.dnsNames")).map(|i| cert.req(&format!("spec.dnsNames[{i}]"))).collect();
                let usages: Vec<&str> = (0..cert.len("spec.usages")).map(|i| cert.req(&format!("spec.usages[{i}]"))).collect();
                assert!(usages.contains(&"server auth") && usages.contains(&"client auth"), "{s}: {usages:?}");
                match cert.req("metadata.annotations.tessera.io/tls-for") {
                    "worker" => assert!(covers(&names, &advertise), "{s}: {names:?} do not cover {advertise}"),
                    "etcd" => {
                        let host = env["TESSERA_ETCD_ENDPOINTS"].trim_start_matches("https://").split(':').next().unwrap().to_string();
                        assert!(covers(&names, &host), "{s}: {names:?} do not cover {host}");
                    }
                    _ => {}
                }
                // The issuer is the chart's CA Issuer, or the one the values name.
                let kind = cert.req("spec.issuerRef.kind");
                if kind == "Issuer" {
                    let issuer = r.named("Issuer", cert.req("spec.issuerRef.name"));
                    assert!(issuer.has("spec.ca.secretName"), "{s}: issued by {}, not a CA Issuer", issuer.id());
                    let ca =
                        r.all("Certificate").into_iter().find(|c| c.get("spec.secretName") == issuer.get("spec.ca.secretName")).expect("the CA Certificate");
                    assert_eq!(ca.get("spec.isCA"), Some("true"));
                    assert!(r.named("Issuer", ca.req("spec.issuerRef.name")).has("spec.selfSigned"));
                } else {
                    assert_eq!(kind, "ClusterIssuer", "{s}");
                }
            }
        }
        Issuer::Off => unreachable!(),
    }
}

/// PEM files of one component's certificate, from a render's Secret `<release>-<component>-tls`.
struct Pems {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pems {
    fn of(r: &Rendered, component: &str) -> Self {
        let secret = r.named("Secret", &format!("{RELEASE}-{component}-tls"));
        let dir = tempfile::tempdir().unwrap();
        let file = |key: &str| {
            let path = dir.path().join(key);
            std::fs::write(&path, b64_decode(secret.req(&format!("data.{key}")))).unwrap();
            path
        };
        let (ca, cert, key) = (file("ca.crt"), file("tls.crt"), file("tls.key"));
        Self { _dir: dir, ca, cert, key }
    }
    /// The process's flags, as the chart's env gives them.
    fn args(&self) -> TlsArgs {
        TlsArgs { tls_cert: Some(self.cert.clone()), tls_key: Some(self.key.clone()), tls_ca: Some(self.ca.clone()) }
    }
    fn etcd_args(&self) -> EtcdTlsArgs {
        EtcdTlsArgs { etcd_ca: Some(self.ca.clone()), etcd_cert: Some(self.cert.clone()), etcd_key: Some(self.key.clone()) }
    }
    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A grpc.health check over TLS at 127.0.0.1:`port`, verifying the server as `name`.
async fn health_over_tls(port: u16, name: &str, tls: ClientTlsConfig) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls.domain_name(name))
        .map_err(|e| e.to_string())?;
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.map(|_| ()).map_err(|e| format!("{e:?}"))
}

#[test]
fn generated_certificates_let_the_coordinator_reach_a_worker_by_its_name_and_nobody_else() {
    let Some(t) = tools() else { return };
    let release = Rendered { name: "default values".into(), docs: render(&t, None, &[]) };
    let other = Rendered { name: "another release".into(), docs: render(&t, None, &[]) };
    assert_eq!(issuer(&release), Issuer::Helm, "Helm issues the certificates when cert-manager is absent");
    let (coordinator, worker, stranger) = (Pems::of(&release, "coordinator"), Pems::of(&release, "worker"), Pems::of(&other, "coordinator"));
    let advertise = release.container_env(release.one("StatefulSet", "worker"), C0)["TESSERA_WORKER_ADVERTISE_HOST"].replace("$(POD_NAME)", "tessera-worker-3");
    let client = coordinator.args().load().unwrap().unwrap().client();
    runtime().block_on(async {
        // A worker's internal port as tessera-worker serves it: mutual TLS with its certificate.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let incoming = worker.args().load().unwrap().unwrap().incoming(listener);
        tokio::spawn(Server::builder().add_service(health).serve_with_incoming(incoming));

        // The coordinator dials the worker's advertised name and gets through.
        health_over_tls(port, &advertise, client.clone()).await.unwrap_or_else(|e| panic!("the coordinator cannot reach {advertise}: {e}"));
        // The worker's certificate is for the workers' names, not the coordinator's.
        let elsewhere = format!("{RELEASE}-coordinator.{NAMESPACE}.svc.cluster.local");
        assert!(health_over_tls(port, &elsewhere, client.clone()).await.is_err(), "the worker's certificate passed for {elsewhere}");
        // A process of another release (another CA) is refused, and so is a client that trusts
        // the worker but presents another CA's certificate, or none.
        let foreign = stranger.args().load().unwrap().unwrap().client();
        assert!(health_over_tls(port, &advertise, foreign).await.is_err(), "another release's coordinator got through");
        let ca = Certificate::from_pem(Pems::read(&coordinator.ca));
        let impostor = ClientTlsConfig::new().ca_certificate(ca.clone()).identity(Identity::from_pem(Pems::read(&stranger.cert), Pems::read(&stranger.key)));
        assert!(health_over_tls(port, &advertise, impostor).await.is_err(), "a client certificate of another CA got through");
        assert!(health_over_tls(port, &advertise, ClientTlsConfig::new().ca_certificate(ca)).await.is_err(), "a client without a certificate got through");
    });
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The `etcd` binary on PATH; `None` outside CI when missing (CI installs it).
fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).map(|d| d.join("etcd")).find(|p| p.is_file());
    if found.is_none() {
        assert!(!in_ci(), "CI=true requires etcd for the chart's etcd TLS test: apt-get install -y etcd-server");
        eprintln!("skipping the chart's etcd TLS test: no `etcd` on PATH");
    }
    found
}

/// Kills the etcd child when the test ends, however it ends.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` over plain HTTP/1.0 at 127.0.0.1:`port`: the status line.
fn http_status(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return "refused".into() };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.lines().next().unwrap_or("").to_string()
}

#[test]
fn bundled_etcd_serves_with_the_charts_tls_settings_and_certificates() {
    let Some(t) = tools() else { return };
    let Some(binary) = etcd_binary() else { return };
    let release = Rendered { name: "default values".into(), docs: render(&t, None, &[]) };
    let other = Rendered { name: "another release".into(), docs: render(&t, None, &[]) };
    let etcd = release.one("StatefulSet", "etcd");
    let (etcd_pems, coordinator, stranger) = (Pems::of(&release, "etcd"), Pems::of(&release, "coordinator"), Pems::of(&other, "coordinator"));
    let tls_dir = etcd_pems.ca.parent().unwrap();
    let data = tempfile::tempdir().unwrap();

    // etcd's environment exactly as the StatefulSet sets it, but for what only a pod has: its
    // name, the DNS names of the headless Service (here 127.0.0.1, which the certificate also
    // names), the mount and the data folder, and free ports.
    let (client, peer, metrics) = (free_port(), free_port(), free_port());
    let pod = format!("{RELEASE}-etcd-0");
    let peer_domain = format!("{RELEASE}-etcd-headless.{NAMESPACE}.svc.cluster.local");
    let mount = tls_mount(etcd).expect("etcd mounts its certificate").1.to_string();
    let mut cmd = std::process::Command::new(&binary);
    cmd.env_clear();
    for i in 0..etcd.len(&format!("{C0}.env")) {
        let name = etcd.req(&format!("{C0}.env[{i}].name"));
        let Some(value) = etcd.get(&format!("{C0}.env[{i}].value")) else { continue };
        let value = value
            .replace("$(POD_NAME)", &pod)
            .replace(&format!("{pod}.{peer_domain}"), "127.0.0.1")
            .replace(&mount, &tls_dir.display().to_string())
            .replace("/var/lib/etcd/data", &data.path().join("data").display().to_string())
            .replace(":2379", &format!(":{client}"))
            .replace(":2380", &format!(":{peer}"))
            .replace(":2381", &format!(":{metrics}"));
        cmd.env(name, value);
    }
    let log = std::fs::File::create(data.path().join("etcd.log")).unwrap();
    let _child = Child(cmd.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap_or_else(|e| panic!("{}: {e}", binary.display())));

    let endpoint = vec![format!("https://127.0.0.1:{client}")];
    let heartbeat = Heartbeat::new(Duration::from_millis(250)).unwrap();
    let logged = || std::fs::read_to_string(data.path().join("etcd.log")).unwrap_or_default();
    runtime().block_on(async {
        // The coordinator's certificate (its etcd flags as the chart sets them) gets in.
        let started = Instant::now();
        let tls = coordinator.etcd_args().load().unwrap();
        while EtcdMembership::connect_tls(&endpoint, "chart", heartbeat, tls.clone()).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "etcd with the chart's settings never let the coordinator in:\n{}", logged());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Another release's certificate does not, and neither does plain HTTP.
        let foreign = stranger.etcd_args().load().unwrap();
        assert!(EtcdMembership::connect_tls(&endpoint, "chart", heartbeat, foreign).await.is_err(), "another CA's client got into etcd");
        let plain = vec![format!("http://127.0.0.1:{client}")];
        assert!(EtcdMembership::connect(&plain, "chart", heartbeat).await.is_err(), "etcd answered plain HTTP");
    });
    // The readiness probe's endpoint answers in plain HTTP.
    let status = http_status(metrics, "/health");
    assert!(status.starts_with("HTTP/1.") && status.ends_with(" 200 OK"), "etcd's /health on the metrics port: {status}\n{}", logged());
}

#[test]
fn certificates_come_from_cert_manager_when_the_cluster_serves_it_and_from_helm_otherwise() {
    let Some(t) = tools() else { return };
    let external = "etcd.external.endpoints[0]=https://etcd.infra:2379";
    for (sets, expect) in [
        (&[][..], Issuer::Helm),
        (&["api-versions=cert-manager.io/v1"][..], Issuer::CertManager),
        (&["api-versions=cert-manager.io/v1", "tls.issuer=helm"][..], Issuer::Helm),
        (&["tls.issuer=certManager"][..], Issuer::CertManager),
        (&["tls.enabled=false", "api-versions=cert-manager.io/v1"][..], Issuer::Off),
        (&["etcd.enabled=false", external][..], Issuer::Helm),
    ] {
        let r = Rendered { name: format!("{sets:?}"), docs: render(&t, None, sets) };
        assert_eq!(issuer(&r), expect, "{sets:?}");
        check_common(&r);
        check_tls(&r);
        if sets.contains(&external) {
            // An external etcd's TLS is its own (extraEnv): the chart gives its certificate only
            // to the internal API.
            let env = r.container_env(r.one("Deployment", "coordinator"), C0);
            assert!(!env.contains_key("TESSERA_ETCD_CA") && env["TESSERA_ETCD_ENDPOINTS"] == "https://etcd.infra:2379", "{env:?}");
        }
    }
}
