//! Real worker processes talking TCP on loopback: every transformer golden case run by 2 and 3
//! `tessera-worker forward` processes (ring, and Ulysses where the heads allow) must equal the
//! one-process forward to float32 rounding and pass the case's reference tolerance.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tessera_worker::golden::{discover, CaseKind, CaseMeta, Comparison};
use tessera_worker::weights::SafetensorsFile;

/// Sharded against one-process output: the ranks compute the same sums in another order.
const SHARDED_VS_ONE_REL_L2: f64 = 1e-5;

fn worker() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera-worker"));
    c.env("TESSERA_THREADS", "1");
    c
}

fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let ls: Vec<_> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

fn check(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read_output(path: &Path) -> Vec<f32> {
    SafetensorsFile::open(path).unwrap().read_f32("output").unwrap().1
}

/// Runs `ranks` processes on one case; returns each rank's output file and report line.
fn run_group(case: &Path, ranks: usize, ulysses: usize, dir: &Path) -> Vec<(PathBuf, String)> {
    let addrs = free_addrs(ranks);
    let peers = addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let children: Vec<_> = (0..ranks)
        .map(|r| {
            let out = dir.join(format!("p{ranks}u{ulysses}r{r}.safetensors"));
            let child = worker()
                .args(["forward", "--model"])
                .arg(case)
                .arg("--inputs")
                .arg(case.join("io.safetensors"))
                .arg("--output")
                .arg(&out)
                .args(["--rank", &r.to_string(), "--peers", &peers, "--ulysses", &ulysses.to_string(), "--session", "42"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (out, child)
        })
        .collect();
    children.into_iter().enumerate().map(|(r, (out, child))| (out, check(child.wait_with_output().unwrap(), &format!("rank {r}")))).collect()
}

#[test]
fn worker_processes_over_tcp_compute_the_one_process_forward() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
    let cases = discover(&root, &[CaseKind::Dit]).unwrap();
    assert!(!cases.is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let mut groups = 0;
    for case in &cases {
        let meta = CaseMeta::read(&case.dir).unwrap();
        let reference = SafetensorsFile::open(&case.dir.join("io.safetensors")).unwrap().read_f32("output").unwrap().1;
        let dir = tmp.path().join(case.name.replace('/', "_"));
        std::fs::create_dir_all(&dir).unwrap();
        let single = dir.join("single.safetensors");
        check(
            worker()
                .args(["forward", "--model"])
                .arg(&case.dir)
                .arg("--inputs")
                .arg(case.dir.join("io.safetensors"))
                .arg("--output")
                .arg(&single)
                .output()
                .unwrap(),
            "one process",
        );
        let one = read_output(&single);
        let heads = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(case.dir.join("config.json")).unwrap()).unwrap()["num_attention_heads"]
            .as_u64()
            .unwrap() as usize;
        let mut plans = vec![(2, 1), (3, 1)];
        plans.extend([(2, 2), (3, 3)].into_iter().filter(|&(_, u)| heads.is_multiple_of(u)));
        for (ranks, ulysses) in plans {
            for (rank, (out, report)) in run_group(&case.dir, ranks, ulysses, &dir).into_iter().enumerate() {
                let got = read_output(&out);
                let vs_one = Comparison::new(&got, &one, &meta.tolerance);
                assert!(
                    vs_one.rel_l2 <= SHARDED_VS_ONE_REL_L2,
                    "{} P={ranks} U={ulysses} rank {rank}: rel_l2 {} against one process",
                    case.name,
                    vs_one.rel_l2
                );
                let vs_ref = Comparison::new(&got, &reference, &meta.tolerance);
                assert!(vs_ref.passed, "{} P={ranks} U={ulysses} rank {rank}: {vs_ref:?} against the reference", case.name);
                let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
                let moved = if ulysses > 1 { &report["bytes_sent"]["all_to_all"] } else { &report["bytes_sent"]["ring"] };
                assert!(moved.as_u64().unwrap() > 0, "{report}");
            }
            groups += 1;
        }
    }
    assert!(groups >= cases.len() * 2);
}

#[test]
fn a_rank_whose_peers_never_come_fails_with_a_clear_message() {
    let case = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/dit/t2v-a");
    let tmp = tempfile::tempdir().unwrap();
    let peers = free_addrs(2).iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let out = worker()
        .args(["forward", "--model"])
        .arg(&case)
        .arg("--inputs")
        .arg(case.join("io.safetensors"))
        .arg("--output")
        .arg(tmp.path().join("o.safetensors"))
        .args(["--rank", "1", "--peers", &peers, "--connect-timeout-s", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("group of 2 not connected within"), "{err}");
}

#[test]
fn bad_flags_are_named() {
    let case = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/dit/t2v-a");
    let out = worker()
        .args(["forward", "--model"])
        .arg(&case)
        .arg("--inputs")
        .arg(case.join("io.safetensors"))
        .args(["--output", "/tmp/x", "--rank", "3", "--peers", "127.0.0.1:1,127.0.0.1:2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rank 3 is outside"));
    let out = worker().args(["forward", "--model", "/nonexistent", "--inputs", "/x", "--output", "/y"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model /nonexistent"));
}
