//! Job capabilities on the internal API: at PrepareJob the coordinator gives each rank a random
//! per-job secret (`PrepareJobRequest.job_secret`), and every later job-scoped call (Step,
//! Checkpoint, Decode, FetchLatents, ReleaseJob) carries it in the metadata entry
//! [`JOB_SECRET_KEY`]. A worker answers a call without the job's secret with PERMISSION_DENIED,
//! whoever reaches its port: a job can be driven and released only by the coordinator that
//! started it.

use tonic::metadata::{BinaryMetadataValue, MetadataMap};
use tonic::service::Interceptor;

/// The metadata key (binary, so the secret travels base64-encoded).
pub const JOB_SECRET_KEY: &str = "tessera-job-secret-bin";
/// Bytes of a secret the coordinator issues.
pub const JOB_SECRET_BYTES: usize = 32;
/// The sizes a worker accepts in PrepareJob (shorter ones are guessable).
pub const JOB_SECRET_RANGE: std::ops::RangeInclusive<usize> = 16..=64;

/// The job secret a call carries, if any.
pub fn job_secret(metadata: &MetadataMap) -> Option<Vec<u8>> {
    metadata.get_bin(JOB_SECRET_KEY)?.to_bytes().ok().map(|b| b.to_vec())
}

/// Adds the job's secret to every call of a client (`InterceptedService::new(channel, it)`).
#[derive(Clone, Debug)]
pub struct JobSecret(BinaryMetadataValue);

impl JobSecret {
    /// The interceptor sending `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self(BinaryMetadataValue::from_bytes(secret))
    }

    /// Puts the secret on one request.
    pub fn attach<T>(&self, request: &mut tonic::Request<T>) {
        request.metadata_mut().insert_bin(JOB_SECRET_KEY, self.0.clone());
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
    }
}
