//! `tessera golden`: runs every golden case under the given roots and prints one line per case.

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tessera_kernels::backend::Backend;
use tessera_kernels::Device;
use tessera_worker::golden::{discover, run_case_measured, CaseKind, RunOptions, Tolerance, BF16_VAE_TOLERANCE, BF16_VIDEO_TOLERANCE, CUDA_BF16_TOLERANCE};
use tessera_worker::parallel::LocalTransport;

/// Arguments of `tessera golden`.
#[derive(Args)]
pub struct GoldenArgs {
    /// Kinds of case to run (dit, vae, umt5, scheduler, clip, pipeline); all when not given.
    #[arg(long = "kind", env = "TESSERA_GOLDEN_KIND", value_delimiter = ',')]
    kinds: Vec<String>,
    /// Run transformer cases sharded over this many in-process ranks (sequence parallelism).
    #[arg(long, env = "TESSERA_GOLDEN_RANKS", default_value_t = 1)]
    ranks: usize,
    /// Ulysses (all-to-all) degree among the ranks; the rest is ring. Must divide ranks and heads.
    #[arg(long, env = "TESSERA_GOLDEN_ULYSSES", default_value_t = 1)]
    ulysses: usize,
    /// Pipeline cases: split the ranks into two CFG halves, one guidance pass each (--ranks even;
    /// --ulysses divides a half). Transformer cases are one forward and say so.
    #[arg(long, env = "TESSERA_GOLDEN_CFG_PARALLEL")]
    cfg_parallel: bool,
    /// How the sharded ranks talk: `inproc` (mailboxes) or `tcp` (real sockets on loopback).
    #[arg(long, env = "TESSERA_GOLDEN_TRANSPORT", default_value = "inproc")]
    transport: String,
    /// The backend transformer (dit) and pipeline cases run their transformer on: cpu (f32, held
    /// to each case's own tolerance), bf16-host (the CUDA path's bf16 contract on the CPU), cuda
    /// or cuda:N (bf16 on a GPU), or auto (a usable GPU, else the CPU). The bf16 backends are
    /// held to the bf16 tolerance; the other kinds always run on the CPU.
    #[arg(long, alias = "device", env = "TESSERA_GOLDEN_BACKEND", default_value = "cpu")]
    backend: String,
    /// Folders laid out like `shared/golden` (`<kind>/<case>/case.json`), or one `<kind>` folder.
    #[arg(required = true, env = "TESSERA_GOLDEN_ROOTS", value_delimiter = ',')]
    roots: Vec<PathBuf>,
}

/// Runs the cases; exit status 1 if any selected case fails, errors or is unsupported.
pub fn run(args: GoldenArgs) -> Result<ExitCode> {
    let kinds = if args.kinds.is_empty() {
        CaseKind::ALL.to_vec()
    } else {
        args.kinds
            .iter()
            .map(|k| CaseKind::from_name(k).ok_or_else(|| anyhow::anyhow!("--kind {k}: unknown kind ({})", CaseKind::names())))
            .collect::<Result<Vec<_>>>()?
    };
    let mut cases = Vec::new();
    for root in &args.roots {
        let found = discover(root, &kinds).map_err(|e| anyhow::anyhow!("golden root {}: {e}", root.display()))?;
        if found.is_empty() {
            bail!("golden root {}: no cases of kind {:?} found", root.display(), kinds.iter().map(|k| k.name()).collect::<Vec<_>>());
        }
        cases.extend(found.into_iter().map(|c| (root.clone(), c)));
    }
    if args.ranks == 0 || args.ulysses == 0 || !args.ranks.is_multiple_of(args.ulysses) {
        bail!("--ranks {} --ulysses {}: both must be positive and --ulysses must divide --ranks", args.ranks, args.ulysses);
    }
    if args.cfg_parallel && (!args.ranks.is_multiple_of(2) || !(args.ranks / 2).is_multiple_of(args.ulysses)) {
        bail!("--cfg-parallel --ranks {} --ulysses {}: the ranks must halve, and --ulysses divide a half", args.ranks, args.ulysses);
    }
    let transport = LocalTransport::from_name(&args.transport).ok_or_else(|| anyhow::anyhow!("--transport {}: expected inproc or tcp", args.transport))?;
    let backend = resolve_backend(&args.backend)?;
    if backend.is_bf16() {
        let bound = |t: Tolerance| format!("rel_l2 <= {:e}, max_abs <= {:e}·max|ref|", t.rel_l2, t.max_abs_over_max_ref.unwrap_or(f64::NAN));
        println!(
            "backend {}: every model in bf16; instead of the cases' f32 tolerances, transformer and text-encoder cases are held to {}, VAE cases to {}, pipelines' decoded frames to {}; diffusion-forcing stages to these × √(chunks they depend on)",
            backend.name(),
            bound(CUDA_BF16_TOLERANCE),
            bound(BF16_VAE_TOLERANCE),
            bound(BF16_VIDEO_TOLERANCE)
        );
    } else {
        println!("backend {}: f32, every case held to its own tolerance (its case.json)", backend.name());
    }
    let opts = RunOptions { ranks: args.ranks, ulysses: args.ulysses, cfg_parallel: args.cfg_parallel, transport, backend };
    let (mut passed, mut failed) = (0usize, 0usize);
    println!("{:<10} {:<40} {:>10} {:>10}  result", "kind", "case", "rel_l2", "max_abs");
    for (root, case) in &cases {
        let (outcome, ran) = run_case_measured(case, &opts);
        let (rel, abs) = outcome.worst().map(|(_, c)| (format!("{:.3e}", c.rel_l2), format!("{:.3e}", c.max_abs))).unwrap_or(("-".into(), "-".into()));
        let name = if args.roots.len() > 1 { format!("{}:{}", root.display(), case.name) } else { case.name.clone() };
        let detail = match &outcome {
            tessera_worker::golden::Outcome::Unsupported(why) | tessera_worker::golden::Outcome::Error(why) => format!(" ({why})"),
            tessera_worker::golden::Outcome::Fail(cs) => {
                let bad: Vec<String> =
                    cs.iter().filter(|(_, c)| !c.passed).map(|(n, c)| format!("{n}: rel_l2 {:.3e}, max_abs {:.3e}", c.rel_l2, c.max_abs)).collect();
                format!(" ({})", bad.join("; "))
            }
            _ => String::new(),
        };
        println!("{:<10} {:<40} {:>10} {:>10}  {}{}  ranks={} moved={}", case.kind.name(), name, rel, abs, outcome.label(), detail, ran.ranks, ran.moved);
        if outcome.passed() {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Parses and resolves a `--backend` value on this machine: `bf16-host`, or a device as
/// [`resolve_device`] resolves it.
fn resolve_backend(arg: &str) -> Result<Backend> {
    if arg == "bf16-host" {
        return Ok(Backend::Bf16Host);
    }
    tessera_worker::pipeline::resolve_pipeline_device(arg).map(Backend::from).map_err(|e| anyhow::anyhow!("--backend {arg}: {e} (or bf16-host)"))
}

/// Parses and resolves a `--device` value on this machine: `cuda` without a usable GPU is an
/// error naming what is missing; `auto` falls back to the CPU.
pub(crate) fn resolve_device(arg: &str) -> Result<Device> {
    tessera_worker::pipeline::resolve_pipeline_device(arg).map_err(|e| anyhow::anyhow!("--device {arg}: {e}"))
}
