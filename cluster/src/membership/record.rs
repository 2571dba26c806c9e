//! What a worker publishes about itself in membership: the JSON record stored under
//! `/tessera/<cluster>/workers/<id>`, its state, and the checks on ids.

use crate::{ClusterError, Result};
use serde::{Deserialize, Serialize};

/// The longest worker, job or cluster id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Where a worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Loading its model; takes no job yet.
    Starting,
    /// Ready for a job.
    Idle,
    /// Running a job (`job_id` says which).
    Busy,
    /// Finishing its job before it exits; takes no new jobs.
    Draining,
}

impl WorkerState {
    /// The name used in JSON and logs (`starting`, `idle`, `busy`, `draining`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Idle => "idle",
            Self::Busy => "busy",
            Self::Draining => "draining",
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A worker as registered in membership (the value stored under its key, as JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique id within the cluster; the last segment of the key.
    pub worker_id: String,
    /// Internal gRPC address (`host:port`) the coordinator drives the worker on.
    pub address: String,
    /// Address (`host:port`) of the worker's TCP collective transport.
    pub collective_address: String,
    /// Model served (e.g. `wan2.1-t2v-1.3b`).
    pub model: String,
    /// Compute devices, e.g. `cpu` or `cuda:0 NVIDIA H100 80GB HBM3`.
    pub devices: Vec<String>,
    /// Memory available for jobs, bytes.
    pub memory_bytes: u64,
    /// Software version of the worker.
    pub version: String,
    /// Where the worker is in its life.
    pub state: WorkerState,
    /// The job it runs (set when busy, possibly when draining).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// What the coordinator needs to know of the model to plan and default a job.
    #[serde(default)]
    pub model_info: ModelInfo,
    /// A CPU worker's measured rates, which the planner predicts its jobs with (GPU kinds are
    /// known by the device's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<ComputeFigures>,
}

/// Rates measured on a worker's CPU.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComputeFigures {
    /// f32 GEMM FLOP/s.
    pub flops: f64,
    /// Memory copy bandwidth, bytes/s (read and write counted).
    pub bytes_per_s: f64,
}

/// The largest transformer a record may describe (the planner multiplies these by token counts
/// in 64 bits): hidden width, feed-forward width, layers, latent channels, text width, patch side.
const MAX_HIDDEN: usize = 1 << 16;
const MAX_FFN: usize = 1 << 20;
const MAX_LAYERS: usize = 1024;
const MAX_CHANNELS: usize = 1024;
const MAX_PATCH: usize = crate::limits::MAX_PATCH as usize;

/// The served model's facts that planning and validation need (sizes zero when a worker did not
/// say; the factors then Wan's).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Attention heads of the transformer (a Ulysses degree must divide them).
    pub attention_heads: u32,
    /// Default frame width of a request.
    pub width: u32,
    /// Default frame height.
    pub height: u32,
    /// Default number of frames.
    pub num_frames: u32,
    /// Default denoising steps.
    pub steps: u32,
    /// How the model turns video into tokens (its VAE's factors): every size check of a job for
    /// this model uses them.
    #[serde(default)]
    pub factors: crate::limits::ModelFactors,
    /// The transformer's configuration, which the planner sizes jobs with (absent from workers
    /// that do not say: their jobs are then not planned by memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformer: Option<crate::TransformerConfig>,
    /// Parameters of the text encoder (0: not said; the planner then assumes UMT5-XXL's).
    #[serde(default)]
    pub text_encoder_params: u64,
    /// Width of the VAE's full-resolution stage (0: not said; Wan's 96).
    #[serde(default)]
    pub vae_base_dim: u32,
    /// Parameters of the VAE (0: not said; Wan's).
    #[serde(default)]
    pub vae_params: u64,
    /// A diffusion-forcing model's causal block and long-video defaults (`None`: the model is
    /// not one, and requests for it may not set `diffusion_forcing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forcing: Option<crate::forcing::ForcingDefaults>,
    /// Whether the model makes videos from an image (Wan 2.1 I2V): its requests must carry
    /// `input_image`, and the others may not.
    #[serde(default)]
    pub image_to_video: bool,
    /// Parameters of the image encoder (0: none, or not said).
    #[serde(default)]
    pub image_encoder_params: u64,
}

impl WorkerRecord {
    /// A record in state `Starting` with no job, on the local crate version.
    pub fn starting(
        worker_id: impl Into<String>,
        address: impl Into<String>,
        collective_address: impl Into<String>,
        model: impl Into<String>,
        devices: Vec<String>,
        memory_bytes: u64,
    ) -> Self {
        Self {
            worker_id: worker_id.into(),
            address: address.into(),
            collective_address: collective_address.into(),
            model: model.into(),
            devices,
            memory_bytes,
            version: env!("CARGO_PKG_VERSION").to_string(),
            state: WorkerState::Starting,
            job_id: None,
            model_info: ModelInfo::default(),
            compute: None,
        }
    }

    /// Checks the record: ids well formed, addresses and model present, and the job id agreeing
    /// with the state (busy needs a job; starting and idle have none).
    pub fn validate(&self) -> Result<()> {
        validate_id("worker_id", &self.worker_id)?;
        for (field, value) in [("address", &self.address), ("collective_address", &self.collective_address), ("model", &self.model)] {
            if value.trim().is_empty() {
                return Err(ClusterError::input(field, format!("worker `{}` has an empty {field}", self.worker_id)));
            }
        }
        check_state_and_job(self.state, self.job_id.as_deref())?;
        let factors = self.model_info.factors.check().map_err(|e| ClusterError::input("model_info.factors", e.to_string()))?;
        if let Some(t) = &self.model_info.transformer {
            t.validate().map_err(|e| ClusterError::input("model_info.transformer", e))?;
            if t.patch_size.map(|p| p as u64) != factors.patch {
                let detail = format!("patch_size {:?} disagrees with the factors' patch {:?}", t.patch_size, factors.patch);
                return Err(ClusterError::input("model_info.transformer", detail));
            }
            let sizes = [
                ("hidden width", t.inner_dim(), MAX_HIDDEN),
                ("ffn_dim", t.ffn_dim, MAX_FFN),
                ("num_layers", t.num_layers, MAX_LAYERS),
                ("in_channels", t.in_channels, MAX_CHANNELS),
                ("out_channels", t.out_channels, MAX_CHANNELS),
                ("text_dim", t.text_dim, MAX_HIDDEN),
                ("image_dim", t.image_dim.unwrap_or(0), MAX_HIDDEN),
                ("patch side", t.patch_size.into_iter().max().unwrap_or(0), MAX_PATCH),
            ];
            if let Some((name, v, most)) = sizes.iter().find(|(_, v, most)| v > most) {
                return Err(ClusterError::input("model_info.transformer", format!("{name} {v} is past {most}")));
            }
        }
        let info = &self.model_info;
        if info.text_encoder_params > 1 << 40 || info.vae_params > 1 << 40 || info.vae_base_dim as usize > MAX_CHANNELS {
            return Err(ClusterError::input(
                "model_info",
                format!("text encoder {} / VAE {} parameters or VAE width {} out of range", info.text_encoder_params, info.vae_params, info.vae_base_dim),
            ));
        }
        if let Some(c) = self.compute {
            if ![c.flops, c.bytes_per_s].iter().all(|v| v.is_finite() && *v > 0.0 && *v < 1e18) {
                return Err(ClusterError::input("compute", format!("rates {c:?} must be positive and finite")));
            }
        }
        Ok(())
    }

    /// The record as the JSON stored in membership.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| ClusterError::Membership(format!("encoding worker `{}`: {e}", self.worker_id)))
    }

    /// Parses and validates a stored record.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let record: Self = serde_json::from_slice(bytes).map_err(|e| ClusterError::Membership(format!("malformed worker record: {e}")))?;
        record.validate()?;
        Ok(record)
    }
}

/// Checks that a state and job id agree: `Busy` needs a job, `Starting` and `Idle` have none, and
/// a job id is itself a valid id.
pub fn check_state_and_job(state: WorkerState, job_id: Option<&str>) -> Result<()> {
    match (state, job_id) {
        (WorkerState::Busy, None) => Err(ClusterError::input("job_id", "a busy worker must name its job")),
        (WorkerState::Starting | WorkerState::Idle, Some(job)) => {
            Err(ClusterError::input("job_id", format!("a worker in state {state} runs no job, but job `{job}` was given")))
        }
        (_, Some(job)) => validate_id("job_id", job),
        (_, None) => Ok(()),
    }
}

/// Checks an id used as a key segment: non-empty, at most [`MAX_ID_LEN`] bytes, no `/`, no
/// whitespace or control characters.
pub fn validate_id(field: &'static str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(ClusterError::input(field, "must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(ClusterError::input(field, format!("is {} bytes long, the limit is {MAX_ID_LEN}", id.len())));
    }
    if id.contains('/') {
        return Err(ClusterError::input(field, format!("`{id}` contains '/', which separates key segments")));
    }
    if let Some(c) = id.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(ClusterError::input(field, format!("`{}` contains the character {c:?}", id.escape_debug())));
    }
    Ok(())
}

/// The key prefix all workers of `cluster` live under: `/tessera/<cluster>/workers/`.
pub fn workers_prefix(cluster: &str) -> String {
    format!("/tessera/{cluster}/workers/")
}

/// The key of one worker: `/tessera/<cluster>/workers/<id>`.
pub fn worker_key(cluster: &str, worker_id: &str) -> String {
    format!("{}{worker_id}", workers_prefix(cluster))
}

impl From<WorkerState> for tessera_proto::v1::WorkerState {
    fn from(state: WorkerState) -> Self {
        match state {
            WorkerState::Starting => Self::Starting,
            WorkerState::Idle => Self::Idle,
            WorkerState::Busy => Self::Busy,
            WorkerState::Draining => Self::Draining,
        }
    }
}

impl From<&WorkerRecord> for tessera_proto::v1::Worker {
    /// The public API's view of a worker (`ListWorkers`); the collective address stays internal.
    fn from(r: &WorkerRecord) -> Self {
        Self {
            worker_id: r.worker_id.clone(),
            address: r.address.clone(),
            model: r.model.clone(),
            devices: r.devices.clone(),
            memory_bytes: r.memory_bytes,
            state: tessera_proto::v1::WorkerState::from(r.state) as i32,
            job_id: r.job_id.clone().unwrap_or_default(),
            version: r.version.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> WorkerRecord {
        WorkerRecord::starting("w-0", "127.0.0.1:7001", "127.0.0.1:7101", "wan2.1-t2v-1.3b", vec!["cpu".into()], 8 << 30)
    }

    #[test]
    fn json_round_trips_with_snake_case_state_and_no_job_field_when_idle() {
        let mut r = record();
        r.state = WorkerState::Idle;
        let json = String::from_utf8(r.to_json().unwrap()).unwrap();
        assert!(json.contains(r#""state":"idle""#), "{json}");
        assert!(!json.contains("job_id"), "{json}");
        assert_eq!(WorkerRecord::from_json(json.as_bytes()).unwrap(), r);
        r.state = WorkerState::Busy;
        r.job_id = Some("job-7".into());
        assert_eq!(WorkerRecord::from_json(&r.to_json().unwrap()).unwrap(), r);
    }

    #[test]
    fn ids_are_checked_with_errors_that_name_the_field() {
        for (id, needle) in [("", "empty"), ("a/b", "'/'"), ("a b", "character"), ("x\u{7}", "character")] {
            let err = validate_id("worker_id", id).unwrap_err().to_string();
            assert!(err.contains("worker_id") && err.contains(needle), "{id:?}: {err}");
        }
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert!(validate_id("worker_id", &long).unwrap_err().to_string().contains("limit is 128"));
        validate_id("worker_id", &"x".repeat(MAX_ID_LEN)).unwrap();
        validate_id("worker_id", "tessera-worker-3.rack_2").unwrap();
    }

    #[test]
    fn state_and_job_must_agree() {
        let mut r = record();
        r.state = WorkerState::Busy;
        assert!(r.validate().unwrap_err().to_string().contains("must name its job"));
        r.state = WorkerState::Idle;
        r.job_id = Some("j".into());
        assert!(r.validate().unwrap_err().to_string().contains("runs no job"));
        r.state = WorkerState::Draining;
        r.validate().unwrap();
        r.job_id = None;
        r.validate().unwrap();
        r.address.clear();
        assert!(r.validate().unwrap_err().to_string().contains("address"));
    }

    #[test]
    fn malformed_json_is_an_error_not_a_panic() {
        assert!(WorkerRecord::from_json(b"{not json").is_err());
        assert!(WorkerRecord::from_json(br#"{"worker_id":"a/b"}"#).is_err());
        let mut r = record();
        r.worker_id = "bad/id".into();
        let bytes = serde_json::to_vec(&r).unwrap();
        assert!(WorkerRecord::from_json(&bytes).unwrap_err().to_string().contains("'/'"));
    }

    #[test]
    fn keys_and_the_proto_view() {
        assert_eq!(worker_key("prod", "w-0"), "/tessera/prod/workers/w-0");
        let mut r = record();
        r.state = WorkerState::Busy;
        r.job_id = Some("job-1".into());
        let p = tessera_proto::v1::Worker::from(&r);
        assert_eq!(p.state, tessera_proto::v1::WorkerState::Busy as i32);
        assert_eq!((p.worker_id.as_str(), p.job_id.as_str(), p.memory_bytes), ("w-0", "job-1", 8 << 30));
    }

    #[test]
    fn a_hostile_model_description_is_refused_naming_the_field() {
        let mut r = record();
        r.model_info.transformer = Some(crate::TransformerConfig::wan21_t2v_14b());
        r.compute = Some(ComputeFigures { flops: 1e11, bytes_per_s: 1e10 });
        let back = WorkerRecord::from_json(&r.to_json().unwrap()).unwrap();
        assert_eq!(back, r);
        let mut huge = r.clone();
        huge.model_info.transformer.as_mut().unwrap().ffn_dim = usize::MAX / 4;
        let err = WorkerRecord::from_json(&huge.to_json().unwrap()).unwrap_err().to_string();
        assert!(err.contains("model_info.transformer") && err.contains("ffn_dim"), "{err}");
        let mut other = r.clone();
        other.model_info.factors.patch = [1, 4, 4];
        let err = other.validate().unwrap_err().to_string();
        assert!(err.contains("model_info.transformer") && err.contains("disagrees"), "{err}");
        other.model_info.transformer.as_mut().unwrap().patch_size = [1, 4, 4];
        other.validate().unwrap();
        other.model_info.factors.spatial = 0;
        assert!(other.validate().unwrap_err().to_string().contains("model_info.factors"));
        let mut nan = r.clone();
        nan.compute = Some(ComputeFigures { flops: -1.0, bytes_per_s: 1e10 });
        assert!(nan.validate().unwrap_err().to_string().contains("compute"));
    }
}
