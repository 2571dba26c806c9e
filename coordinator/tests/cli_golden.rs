//! `tessera golden` as a user runs it: exit status and one line per case, on the project's
//! golden copy, on a tampered copy (must fail), and with bad arguments (clear errors).

use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

fn tessera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).env_remove("TESSERA_GOLDEN_ROOTS").env_remove("TESSERA_GOLDEN_KIND").output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Rewrites a safetensors file through `edit` (name → (dtype, shape, bytes)).
fn rewrite(path: &Path, edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut map);
    let views: Vec<(String, TensorView<'_>)> = map.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn project_dit_cases_pass_with_one_line_each() {
    let (code, out, err) = tessera(&["golden", "--kind", "dit", golden().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with("dit ") && l.trim_end().ends_with("PASS  ranks=1 moved=0")).count(), 5, "{out}");
    assert!(out.contains("5 passed, 0 failed"));
}

/// Every result line says which ranks computed the case and the bytes they exchanged; a kind that
/// cannot run sharded says so and fails instead of passing on one device.
#[test]
fn sharded_lines_say_the_ranks_and_bytes_and_unshardable_kinds_fail() {
    let (code, out, err) = tessera(&["golden", "--kind", "dit", "--ranks", "2", golden().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    let moved: Vec<u64> = out
        .lines()
        .filter(|l| l.starts_with("dit ") && l.contains("PASS  ranks=2 moved="))
        .map(|l| l.rsplit("moved=").next().unwrap().trim().parse().unwrap())
        .collect();
    assert_eq!(moved.len(), 5, "{out}");
    assert!(moved.iter().all(|m| *m > 0), "{out}");
    // The VAE runs split by rows over the ranks, at the case's f32 tolerance.
    for ranks in ["2", "4"] {
        let (code, out, err) = tessera(&["golden", "--kind", "vae", "--ranks", ranks, golden().to_str().unwrap()]);
        assert_eq!(code, 0, "{out}\n{err}");
        let line = out.lines().find(|l| l.starts_with("vae ")).unwrap_or_else(|| panic!("no vae line in {out}"));
        let moved: u64 = line.rsplit("moved=").next().unwrap().trim().parse().unwrap();
        assert!(line.contains(&format!("PASS  ranks={ranks} moved=")) && moved > 0, "{out}");
    }
    let (code, out, _) = tessera(&["golden", "--kind", "umt5", "--ranks", "4", golden().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("umt5 ") && l.contains("UNSUPPORTED") && l.contains("cannot run sharded") && l.ends_with("ranks=0 moved=0")),
        "{out}"
    );
    assert!(!out.contains("PASS"), "{out}");
}

#[test]
fn a_tampered_reference_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let case = tmp.path().join("dit/t2v-a");
    copy_dir(&golden().join("dit/t2v-a"), &case);
    rewrite(&case.join("io.safetensors"), |m| {
        let out = &mut m.get_mut("output").unwrap().2;
        // add 0.01 to one element: rel_l2 stays small but max_abs exceeds 1e-3 · max|ref|
        let x = f32::from_le_bytes(out[0..4].try_into().unwrap()) + 0.01;
        out[0..4].copy_from_slice(&x.to_le_bytes());
    });
    let (code, out, _) = tessera(&["golden", "--kind", "dit", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("dit/t2v-a") && out.contains("FAIL"), "{out}");
}

#[test]
fn a_missing_or_misshaped_weight_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let case = tmp.path().join("dit/t2v-a");
    copy_dir(&golden().join("dit/t2v-a"), &case);
    rewrite(&case.join("diffusion_pytorch_model.safetensors"), |m| {
        m.remove("blocks.1.attn2.norm_k.weight");
    });
    let (code, out, _) = tessera(&["golden", "--kind", "dit", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("ERROR") && out.contains("blocks.1.attn2.norm_k.weight"), "{out}");

    copy_dir(&golden().join("dit/t2v-a"), &case);
    rewrite(&case.join("diffusion_pytorch_model.safetensors"), |m| {
        let (_, shape, _) = m.get_mut("proj_out.bias").unwrap();
        *shape = vec![4, 4];
    });
    let (code, out, _) = tessera(&["golden", "--kind", "dit", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("proj_out.bias") && out.contains("[16]") && out.contains("[4, 4]"), "{out}");

    copy_dir(&golden().join("dit/t2v-a"), &case);
    rewrite(&case.join("diffusion_pytorch_model.safetensors"), |m| {
        let extra = m["proj_out.bias"].clone();
        m.insert("blocks.0.attn1.extra_gate".into(), extra);
    });
    let (code, out, _) = tessera(&["golden", "--kind", "dit", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("unexpected") && out.contains("blocks.0.attn1.extra_gate"), "{out}");
}

#[test]
fn every_kind_passes_and_bad_arguments_fail_clearly() {
    let (code, out, _) = tessera(&["golden", golden().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    for kind in ["dit", "vae", "umt5", "scheduler", "pipeline"] {
        assert!(out.lines().any(|l| l.starts_with(kind) && l.trim_end().ends_with("PASS  ranks=1 moved=0")), "no passing {kind} case in:\n{out}");
    }
    assert!(!out.contains("FAIL") && !out.contains("UNSUPPORTED") && !out.contains("ERROR"), "{out}");
    let (code, _, err) = tessera(&["golden", "--kind", "bogus", golden().to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("--kind bogus"), "{err}");
    let (code, _, err) = tessera(&["golden", "--kind", "dit", "/nonexistent/golden"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/golden"), "{err}");
}
