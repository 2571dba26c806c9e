//! The planner: for a model, a job and a group of devices, the tokens, FLOPs per step by part,
//! per-rank peak memory by part, bytes moved per step per rank and link, and the predicted
//! seconds with their terms; the best layout (Ulysses, ring, CFG-parallel) for a group size;
//! diffusion-forcing long videos chunk by chunk; and the published figures it is calibrated
//! against. `tessera plan` prints it; the coordinator
//! plans every job with it before accepting it. It knows shapes and datasheets, never weights,
//! so the coordinator's server links it without any model code.

pub mod calibration;
pub mod cost;
pub mod forcing;
pub mod gpu;
pub mod model;
pub mod search;

pub use calibration::efficiency;
pub use cost::{evaluate, Evaluation, JobShape, Layout};
pub use forcing::{evaluate_forcing, ForcingEvaluation, ForcingJob};
pub use gpu::GpuKind;
pub use model::ModelShape;
pub use search::{best, candidates, Capabilities};
