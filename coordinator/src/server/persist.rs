//! A job's durable side, with a state store: its record is stored when it is accepted (with its
//! input media), again when its group is chosen and at each checkpoint (with the checkpoint), and
//! a last time when it ends (with its output files, kept for the retention time). A job stopped
//! because the server shuts down keeps its unfinished record: the next coordinator resumes it.
//! Store failures after acceptance are logged and the job goes on (it is then less durable).

use super::durable::{Blob, JobStore, STORE_VERSION};
use super::executor::OutputFile;
use super::jobs::pb_timestamp;
use bytes::Bytes;
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tessera_proto::capability::JOB_SECRET_BYTES;
use tessera_proto::state::v1::{StoredJob, StoredOutput};
use tessera_proto::v1::Job;
use tessera_proto::worker::v1::CheckpointResponse;

/// One job's link to the state store.
pub struct Persisted {
    store: Arc<JobStore>,
    id: String,
    secret: [u8; JOB_SECRET_BYTES],
    has_input_video: bool,
    has_input_image: bool,
    outputs: Mutex<Vec<StoredOutput>>,
    /// How long a finished job's record and output are kept.
    retention: Duration,
}

impl Persisted {
    /// The durable side of job `id`.
    pub fn new(store: Arc<JobStore>, id: &str, secret: [u8; JOB_SECRET_BYTES], media: (bool, bool), retention: Duration) -> Self {
        Self { store, id: id.to_string(), secret, has_input_video: media.0, has_input_image: media.1, outputs: Mutex::new(Vec::new()), retention }
    }

    /// The store.
    pub fn store(&self) -> &Arc<JobStore> {
        &self.store
    }

    fn stored(&self, job: Job, expires: Option<SystemTime>) -> StoredJob {
        StoredJob {
            job: Some(job),
            job_secret: self.secret.to_vec(),
            has_input_video: self.has_input_video,
            has_input_image: self.has_input_image,
            outputs: self.outputs.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            version: STORE_VERSION,
            expires: expires.map(pb_timestamp),
        }
    }

    /// Stores the job at acceptance: its input media, then its record. An error refuses the job
    /// (it could not be made durable).
    pub async fn accept(&self, job: Job, video: Vec<u8>, image: Vec<u8>) -> Result<(), crate::CoordinatorError> {
        if !video.is_empty() {
            self.store.put_blob(&self.id, Blob::InputVideo, Bytes::from(video)).await?;
        }
        if !image.is_empty() {
            self.store.put_blob(&self.id, Blob::InputImage, Bytes::from(image)).await?;
        }
        self.store.save(&self.stored(job, None)).await
    }

    /// Stores the record as it is now (the job's plan or progress changed).
    pub async fn save(&self, job: Option<Job>) {
        let Some(job) = job else { return };
        if let Err(e) = self.store.save(&self.stored(job, None)).await {
            tracing::warn!(job = %self.id, error = %e, "cannot store the job's record");
        }
    }

    /// Stores a checkpoint, then the record (whose progress it matches).
    pub async fn checkpoint(&self, job: Option<Job>, checkpoint: &CheckpointResponse) {
        match self.store.put_blob(&self.id, Blob::Checkpoint, Bytes::from(checkpoint.encode_to_vec())).await {
            Ok(()) => self.save(job).await,
            Err(e) => tracing::warn!(job = %self.id, error = %e, "cannot store the job's checkpoint"),
        }
    }

    /// Stores an output file (listed in the record when it ends).
    pub async fn output(&self, file: &OutputFile) {
        let n = self.outputs.lock().unwrap_or_else(|e| e.into_inner()).len();
        match self.store.put_blob(&self.id, Blob::Output(n), Bytes::from(file.bytes.clone())).await {
            Ok(()) => self.outputs.lock().unwrap_or_else(|e| e.into_inner()).push(StoredOutput {
                content_type: file.content_type.to_string(),
                frame_index: file.frame_index,
                size: file.bytes.len() as u64,
            }),
            Err(e) => tracing::warn!(job = %self.id, error = %e, "cannot store an output file"),
        }
    }

    /// Stores the final record, kept with the output for the retention time, then forgotten.
    pub async fn finished(&self, job: Option<Job>) {
        let Some(job) = job else { return };
        if let Err(e) = self.store.save(&self.stored(job, Some(SystemTime::now() + self.retention))).await {
            tracing::warn!(job = %self.id, error = %e, "cannot store the job's final record");
        }
        forget_later(self.store.clone(), self.id.clone(), self.retention);
    }
}

/// Deletes a finished job's record and blobs after `after`.
pub fn forget_later(store: Arc<JobStore>, id: String, after: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        if let Err(e) = store.forget(&id).await {
            tracing::warn!(job = %id, error = %e, "cannot delete an expired job from the state store");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_is_stored_at_acceptance_checkpoints_and_end_and_forgotten_after_retention() {
        let store = Arc::new(JobStore::in_memory());
        let p = Persisted::new(store.clone(), "j-1", [7; JOB_SECRET_BYTES], (true, false), Duration::from_millis(50));
        let job = Job { job_id: "j-1".into(), ..Default::default() };
        p.accept(job.clone(), b"video".to_vec(), Vec::new()).await.unwrap();
        assert_eq!(store.get_blob("j-1", Blob::InputVideo).await.unwrap().as_deref(), Some(&b"video"[..]));
        let cp = CheckpointResponse { steps_done: 3, ..Default::default() };
        p.checkpoint(Some(job.clone()), &cp).await;
        let back = CheckpointResponse::decode(store.get_blob("j-1", Blob::Checkpoint).await.unwrap().unwrap()).unwrap();
        assert_eq!(back.steps_done, 3);
        p.output(&OutputFile { content_type: "video/mp4", frame_index: 0, bytes: b"mp4".to_vec() }).await;
        p.finished(Some(job)).await;
        let stored = store.get("j-1").await.unwrap().unwrap();
        assert_eq!(stored.outputs.len(), 1);
        assert_eq!(stored.job_secret, [7; JOB_SECRET_BYTES]);
        assert!(stored.has_input_video && stored.expires.is_some());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(store.get("j-1").await.unwrap().is_none(), "forgotten after the retention time");
        assert!(store.get_blob("j-1", Blob::Output(0)).await.unwrap().is_none());
    }
}
