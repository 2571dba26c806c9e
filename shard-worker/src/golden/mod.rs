//! Golden reference cases: folders laid out like `shared/golden` (`<kind>/<case>/` with
//! `case.json`, `io.safetensors` and the component's own files), computed by the upstream Python
//! implementations. This module finds the cases under any number of roots, runs each through the
//! same code users run, and compares with the stated tolerance.

mod clip;
mod compare;
mod dit;
mod forcing;
mod pipeline;
mod scheduler;
mod umt5;
mod vae;

pub use compare::{Comparison, Tolerance};
pub use dit::{forward_options, BF16_VIDEO_TOLERANCE, CUDA_BF16_TOLERANCE};
pub use vae::BF16_VAE_TOLERANCE;

use crate::parallel::LocalTransport;
use crate::weights::SafetensorsFile;
use crate::{Result, WorkerError};
use std::path::{Path, PathBuf};
use tessera_kernels::backend::Backend;
use tessera_kernels::Tensor;

/// The component a case exercises (its top-level folder).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CaseKind {
    /// `WanTransformer3DModel`.
    Dit,
    /// `AutoencoderKLWan`.
    Vae,
    /// `UMT5EncoderModel`.
    Umt5,
    /// Flow-matching samplers.
    Scheduler,
    /// `CLIPVisionModel` with its `CLIPImageProcessor` (image-to-video's image encoder).
    Clip,
    /// Whole pipelines: text-, video- and image-to-video, diffusion forcing.
    Pipeline,
}

impl CaseKind {
    /// All kinds, in run order.
    pub const ALL: [CaseKind; 6] = [Self::Dit, Self::Vae, Self::Umt5, Self::Scheduler, Self::Clip, Self::Pipeline];

    /// The folder name (and command-line name) of the kind.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dit => "dit",
            Self::Vae => "vae",
            Self::Umt5 => "umt5",
            Self::Scheduler => "scheduler",
            Self::Clip => "clip",
            Self::Pipeline => "pipeline",
        }
    }

    /// Parses a kind name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Every kind's name, comma-separated (for messages).
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

/// One case folder.
#[derive(Clone, Debug)]
pub struct Case {
    /// Its component.
    pub kind: CaseKind,
    /// `<kind>/<folder>`, for reports.
    pub name: String,
    /// The folder.
    pub dir: PathBuf,
}

/// Finds the cases of `kinds` under `root`, which is laid out like `shared/golden`
/// (or is itself one `<kind>` folder of such a layout). Sorted by kind, then name. A folder of
/// cases whose kind this runner does not know is an error, never skipped.
pub fn discover(root: &Path, kinds: &[CaseKind]) -> Result<Vec<Case>> {
    let io = |source| WorkerError::Io { path: root.into(), source };
    if !root.is_dir() {
        return Err(io(std::io::Error::new(std::io::ErrorKind::NotFound, "golden root is not a folder")));
    }
    let own_kind = root.file_name().and_then(|n| n.to_str()).and_then(CaseKind::from_name);
    if own_kind.is_none() {
        let holds_cases = |dir: &Path| std::fs::read_dir(dir).is_ok_and(|mut entries| entries.any(|e| e.is_ok_and(|e| e.path().join("case.json").is_file())));
        for entry in std::fs::read_dir(root).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if path.is_dir() && CaseKind::from_name(&name).is_none() && holds_cases(&path) {
                return Err(WorkerError::Config {
                    path: path.display().to_string(),
                    detail: format!("cases of kind `{name}`, which this runner does not know (known: {})", CaseKind::names()),
                });
            }
        }
    }
    let mut cases = Vec::new();
    for &kind in kinds {
        let kind_dir = match own_kind {
            Some(k) if k == kind => root.to_path_buf(),
            Some(_) => continue,
            None => root.join(kind.name()),
        };
        if !kind_dir.is_dir() {
            continue;
        }
        let mut dirs: Vec<PathBuf> =
            std::fs::read_dir(&kind_dir).map_err(io)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("case.json").is_file()).collect();
        dirs.sort();
        for dir in dirs {
            let folder = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            cases.push(Case { kind, name: format!("{}/{folder}", kind.name()), dir });
        }
    }
    Ok(cases)
}

/// How to run cases.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Sequence-parallel ranks for transformer cases (in-process threads); 1 = one device.
    pub ranks: usize,
    /// Ulysses degree among those ranks (the rest is ring): must divide the ranks (a CFG half's
    /// with `cfg_parallel`) and the heads.
    pub ulysses: usize,
    /// Pipeline cases: split the ranks into CFG halves (one guidance pass each).
    pub cfg_parallel: bool,
    /// How the in-process ranks talk: mailboxes, or real TCP on loopback.
    pub transport: LocalTransport,
    /// Where the models of every case run: `cpu` (f32, the cases' tolerances), `bf16-host` or
    /// `cuda` (bf16, [`CUDA_BF16_TOLERANCE`]; the VAE at [`BF16_VAE_TOLERANCE`], a pipeline's
    /// video at [`BF16_VIDEO_TOLERANCE`]).
    pub backend: Backend,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { ranks: 1, ulysses: 1, cfg_parallel: false, transport: LocalTransport::InProcess, backend: Backend::Cpu }
    }
}

impl RunOptions {
    /// The tolerance a case whose own (f32) tolerance is `case` is held to on this backend.
    pub fn tolerance(&self, case: &Tolerance) -> Tolerance {
        if self.backend.is_bf16() {
            CUDA_BF16_TOLERANCE
        } else {
            case.clone()
        }
    }

    /// [`tolerance`](Self::tolerance) for a VAE case: [`BF16_VAE_TOLERANCE`] on the bf16 backends.
    pub fn vae_tolerance(&self, case: &Tolerance) -> Tolerance {
        if self.backend.is_bf16() {
            BF16_VAE_TOLERANCE
        } else {
            case.clone()
        }
    }

    /// [`tolerance`](Self::tolerance) for a pipeline's decoded video: [`BF16_VIDEO_TOLERANCE`] on
    /// the bf16 backends.
    pub fn video_tolerance(&self, case: &Tolerance) -> Tolerance {
        if self.backend.is_bf16() {
            BF16_VIDEO_TOLERANCE
        } else {
            case.clone()
        }
    }
}

/// What running a case gave.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Every compared output is within tolerance.
    Pass(Vec<(String, Comparison)>),
    /// Some output is outside tolerance.
    Fail(Vec<(String, Comparison)>),
    /// The project cannot run this kind of case yet.
    Unsupported(String),
    /// The case could not be run (bad files, load failure): counts as a failure.
    Error(String),
}

impl Outcome {
    /// PASS, FAIL, UNSUPPORTED or ERROR.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Pass(_) => "PASS",
            Outcome::Fail(_) => "FAIL",
            Outcome::Unsupported(_) => "UNSUPPORTED",
            Outcome::Error(_) => "ERROR",
        }
    }

    /// True only for a pass.
    pub fn passed(&self) -> bool {
        matches!(self, Outcome::Pass(_))
    }

    /// The comparison with the largest relative error, if any.
    pub fn worst(&self) -> Option<&(String, Comparison)> {
        match self {
            Outcome::Pass(c) | Outcome::Fail(c) => c.iter().max_by(|a, b| a.1.rel_l2.total_cmp(&b.1.rel_l2)),
            _ => None,
        }
    }
}

/// What a case's run used: the ranks that computed it and the bytes they sent one another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ran {
    /// Ranks that computed the case (1: one device; 0: it did not run).
    pub ranks: usize,
    /// Bytes the ranks sent one another (0 on one device).
    pub moved: u64,
}

/// Runs one case.
pub fn run_case(case: &Case, opts: &RunOptions) -> Outcome {
    run_case_measured(case, opts).0
}

/// Runs one case and says what ran it. A kind that cannot run sharded says so and fails when
/// `opts` asks for more than one rank; it never runs quietly on one device.
pub fn run_case_measured(case: &Case, opts: &RunOptions) -> (Outcome, Ran) {
    let mut ran = Ran { ranks: 1, moved: 0 };
    let sharded = opts.ranks > 1 || opts.ulysses > 1;
    let result = match case.kind {
        CaseKind::Dit => dit::run(case, opts, &mut ran),
        CaseKind::Pipeline => pipeline::run(case, opts, &mut ran),
        CaseKind::Umt5 | CaseKind::Clip if sharded => {
            ran.ranks = 0;
            Ok(Outcome::Unsupported(format!(
                "{} cases cannot run sharded yet (only the transformer, the sampler and the VAE split across ranks); --ranks {} would run them on one device",
                case.kind.name(),
                opts.ranks
            )))
        }
        // the latent stepped as `ranks` slices, each with its own state, as ranks step it: no
        // bytes move between them
        CaseKind::Scheduler => {
            ran.ranks = opts.ranks.max(1);
            scheduler::run(case, opts)
        }
        CaseKind::Umt5 => umt5::run(case, opts),
        CaseKind::Clip => clip::run(case, opts),
        CaseKind::Vae => vae::run(case, opts, &mut ran),
    };
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            ran = Ran::default();
            Outcome::Error(e.to_string())
        }
    };
    (outcome, ran)
}

/// `case.json`: what a case checks and its tolerance.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct CaseMeta {
    /// A sentence saying what the case is.
    #[serde(default)]
    pub what: String,
    /// The tolerance outputs are held to.
    pub tolerance: Tolerance,
}

impl CaseMeta {
    /// Reads `case.json` from a case folder.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("case.json");
        let text = std::fs::read_to_string(&path).map_err(|source| WorkerError::Io { path: path.clone(), source })?;
        serde_json::from_str(&text).map_err(|e| WorkerError::Config { path: path.display().to_string(), detail: e.to_string() })
    }
}

/// Reads a tensor of `io.safetensors` as an f32 [`Tensor`].
pub(crate) fn read_tensor(io: &SafetensorsFile, name: &str) -> Result<Tensor> {
    let (shape, data) = io.read_f32(name)?;
    Ok(Tensor::new(shape, data)?)
}

/// Compares `got` with the reference `name` of `io` under `tol`.
pub(crate) fn compare(io: &SafetensorsFile, name: &str, got: &Tensor, tol: &Tolerance) -> Result<(String, Comparison)> {
    let want = read_tensor(io, name)?;
    if want.shape() != got.shape() {
        return Err(WorkerError::BadTensor { name: name.into(), detail: format!("reference shape {:?}, computed {:?}", want.shape(), got.shape()) });
    }
    Ok((name.to_string(), Comparison::new(got.data(), want.data(), tol)))
}

/// Collects comparisons into an outcome.
pub(crate) fn outcome(comparisons: Vec<(String, Comparison)>) -> Outcome {
    if comparisons.iter().all(|(_, c)| c.passed) {
        Outcome::Pass(comparisons)
    } else {
        Outcome::Fail(comparisons)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovers_cases_by_kind_from_a_root_or_a_kind_folder() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
        let dit = discover(&root, &[CaseKind::Dit]).unwrap();
        assert!(dit.iter().any(|c| c.name == "dit/t2v-a"));
        assert!(dit.iter().all(|c| c.kind == CaseKind::Dit));
        let from_kind_dir = discover(&root.join("dit"), &[CaseKind::Dit, CaseKind::Vae]).unwrap();
        assert_eq!(from_kind_dir.len(), dit.len());
        assert!(discover(&root.join("nope"), &[CaseKind::Dit]).is_err());
    }

    #[test]
    fn a_kind_the_runner_does_not_know_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("dit/a")).unwrap();
        std::fs::write(tmp.path().join("dit/a/case.json"), "{}").unwrap();
        assert_eq!(discover(tmp.path(), &CaseKind::ALL).unwrap().len(), 1);
        // Files and folders without cases are not kinds; a folder of cases is.
        std::fs::create_dir_all(tmp.path().join("notes")).unwrap();
        assert_eq!(discover(tmp.path(), &CaseKind::ALL).unwrap().len(), 1);
        std::fs::create_dir_all(tmp.path().join("siglip/x")).unwrap();
        std::fs::write(tmp.path().join("siglip/x/case.json"), "{}").unwrap();
        let err = discover(tmp.path(), &[CaseKind::Dit]).unwrap_err().to_string();
        assert!(err.contains("siglip") && err.contains("clip"), "{err}");
    }

    /// Every case of the repository's copy runs and passes on the CPU: the runner's own check.
    #[test]
    fn clip_case_passes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
        let cases = discover(&root, &[CaseKind::Clip]).unwrap();
        assert_eq!(cases.len(), 1);
        for case in &cases {
            let outcome = run_case(case, &RunOptions::default());
            assert!(outcome.passed(), "{}: {outcome:?}", case.name);
            // The resize is PIL's bit for bit: one 8-bit level anywhere would be 1/255/std ≈ 0.015.
            let Outcome::Pass(comparisons) = &outcome else { unreachable!() };
            let pixels = comparisons.iter().find(|(n, _)| n == "pixel_values").map(|(_, c)| c.max_abs);
            assert!(pixels.is_some_and(|d| d < 1e-6), "pixel_values differ by {pixels:?}");
            let bf16 = run_case(case, &RunOptions { backend: Backend::Bf16Host, ..Default::default() });
            assert!(bf16.passed(), "{} on bf16-host: {bf16:?}", case.name);
        }
    }
}
