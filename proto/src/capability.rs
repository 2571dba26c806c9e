//! Job capabilities on the internal API: at PrepareJob the coordinator gives each rank a random
//! per-job secret (`PrepareJobRequest.job_secret`), and every later job-scoped call (Step,
//! Checkpoint, Decode, FetchLatents, ReleaseJob) carries it in the metadata entry
//! [`JOB_SECRET_KEY`]. A worker answers a call without the job's secret with PERMISSION_DENIED,
//! whoever reaches its port: a job can be driven and released only by the coordinator that
//! started it.
//!
//! Calls also carry the coordinator's epoch ([`COORDINATOR_EPOCH_KEY`]): when it took its state
//! store, in milliseconds since the Unix epoch (0 for a coordinator without a store). A worker
//! remembers the highest epoch it has been called with and refuses calls of a lower nonzero one
//! (`Reason::Superseded`): a coordinator that lost its store while cut off from etcd, and does not
//! know it yet, cannot drive runs that the store's next owner adopted. A later owner's epoch is
//! higher because it claims the store only after the earlier owner's lease lapsed, a lease TTL at
//! least after that owner claimed it: the hosts' clocks must agree within a TTL.

use tonic::metadata::{AsciiMetadataValue, BinaryMetadataValue, MetadataMap};
use tonic::service::Interceptor;

/// The metadata key (binary, so the secret travels base64-encoded).
pub const JOB_SECRET_KEY: &str = "tessera-job-secret-bin";
/// Bytes of a secret the coordinator issues.
pub const JOB_SECRET_BYTES: usize = 32;
/// The sizes a worker accepts in PrepareJob (shorter ones are guessable).
pub const JOB_SECRET_RANGE: std::ops::RangeInclusive<usize> = 16..=64;

/// The metadata key of the calling coordinator's epoch (decimal milliseconds).
pub const COORDINATOR_EPOCH_KEY: &str = "tessera-coordinator-epoch";

/// The coordinator epoch a call carries: 0 when it carries none, `Err` (with what it carried)
/// when the entry is not a decimal number.
pub fn coordinator_epoch(metadata: &MetadataMap) -> Result<u64, String> {
    match metadata.get(COORDINATOR_EPOCH_KEY) {
        None => Ok(0),
        Some(v) => v.to_str().ok().and_then(|s| s.parse().ok()).ok_or_else(|| format!("{COORDINATOR_EPOCH_KEY}: {v:?} is not a decimal number")),
    }
}

/// The job secret a call carries, if any.
pub fn job_secret(metadata: &MetadataMap) -> Option<Vec<u8>> {
    metadata.get_bin(JOB_SECRET_KEY)?.to_bytes().ok().map(|b| b.to_vec())
}

/// Adds the job's secret (and the coordinator's epoch) to every call of a client
/// (`InterceptedService::new(channel, it)`).
#[derive(Clone, Debug)]
pub struct JobSecret {
    secret: BinaryMetadataValue,
    epoch: Option<AsciiMetadataValue>,
}

impl JobSecret {
    /// The interceptor sending `secret` (and no epoch).
    pub fn new(secret: &[u8]) -> Self {
        Self { secret: BinaryMetadataValue::from_bytes(secret), epoch: None }
    }

    /// The same, sending the coordinator's `epoch` too (none when 0).
    pub fn with_epoch(self, epoch: u64) -> Self {
        Self { epoch: (epoch > 0).then(|| AsciiMetadataValue::from(epoch)), ..self }
    }

    /// Puts the secret and the epoch on one request.
    pub fn attach<T>(&self, request: &mut tonic::Request<T>) {
        request.metadata_mut().insert_bin(JOB_SECRET_KEY, self.secret.clone());
        if let Some(epoch) = &self.epoch {
            request.metadata_mut().insert(COORDINATOR_EPOCH_KEY, epoch.clone());
        }
    }
}

impl Interceptor for JobSecret {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.attach(&mut request);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_travels_in_the_metadata() {
        let secret = [7u8; JOB_SECRET_BYTES];
        let request = JobSecret::new(&secret).call(tonic::Request::new(())).unwrap();
        assert_eq!(job_secret(request.metadata()).as_deref(), Some(&secret[..]));
        assert_eq!(job_secret(&MetadataMap::new()), None);
        assert!(JOB_SECRET_RANGE.contains(&JOB_SECRET_BYTES));
        assert_eq!(coordinator_epoch(request.metadata()), Ok(0), "no epoch: 0");
    }

    #[test]
    fn the_epoch_travels_beside_the_secret_and_garbage_is_refused() {
        let epoch = 1_796_000_000_123u64;
        let request = JobSecret::new(&[1; JOB_SECRET_BYTES]).with_epoch(epoch).call(tonic::Request::new(())).unwrap();
        assert_eq!(coordinator_epoch(request.metadata()), Ok(epoch));
        assert!(job_secret(request.metadata()).is_some());
        let request = JobSecret::new(&[1; JOB_SECRET_BYTES]).with_epoch(0).call(tonic::Request::new(())).unwrap();
        assert_eq!(request.metadata().get(COORDINATOR_EPOCH_KEY), None, "epoch 0 is sent as none");
        for garbage in ["", "-1", "12a", "99999999999999999999999"] {
            let mut m = MetadataMap::new();
            m.insert(COORDINATOR_EPOCH_KEY, garbage.parse().unwrap());
            let e = coordinator_epoch(&m).unwrap_err();
            assert!(e.contains(COORDINATOR_EPOCH_KEY), "{e}");
        }
    }
}
