//! The state store: what a coordinator keeps so that its jobs outlive it (`tessera/v1/state.proto`).
//! Each job's record (a `StoredJob`) goes to a [`RecordStore`]: etcd under the cluster's prefix
//! when the coordinator follows etcd, otherwise the blob store itself (`records/<id>`). The blobs
//! (the latest checkpoint, the request's input media, the output files) go to an `object_store`:
//! a folder (a PVC in the chart) or an S3-compatible bucket, under `jobs/<id>/`.

use crate::CoordinatorError;
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as BlobPath;
use object_store::{ObjectStore, PutPayload};
use prost::Message;
use std::sync::Arc;
use tessera_cluster::records::RecordStore;
use tessera_proto::state::v1::StoredJob;

use super::ownership::StoreOwnership;

/// The layout version this code writes (`StoredJob.version`).
pub const STORE_VERSION: u32 = 1;

/// Largest stored record read back (a record is a few KB: the request's strings are bounded).
const MAX_RECORD_BYTES: usize = 1 << 20;

/// One blob of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blob {
    /// The latest checkpoint (a `tessera.worker.v1.CheckpointResponse`).
    Checkpoint,
    /// The request's input video bytes.
    InputVideo,
    /// The request's input image bytes.
    InputImage,
    /// The n-th output file.
    Output(usize),
}

impl Blob {
    fn name(self) -> String {
        match self {
            Self::Checkpoint => "checkpoint".into(),
            Self::InputVideo => "input-video".into(),
            Self::InputImage => "input-image".into(),
            Self::Output(n) => format!("output-{n}"),
        }
    }
}

/// Records and blobs of the jobs (see the module docs). Cheap to share behind an `Arc`.
pub struct JobStore {
    records: Arc<dyn RecordStore>,
    blobs: Arc<dyn ObjectStore>,
    /// Where the blobs are, for messages.
    location: String,
    /// How one coordinator at a time owns it.
    ownership: StoreOwnership,
}

fn store_error(what: &str, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Store(format!("{what}: {e}"))
}

fn job_dir(id: &str) -> Result<String, CoordinatorError> {
    tessera_cluster::membership::validate_id("job_id", id)?;
    Ok(format!("jobs/{id}"))
}

impl JobStore {
    /// Opens the blob store at `location`: a folder (created if missing), or `s3://BUCKET[/PREFIX]`
    /// with the S3 settings from the standard `AWS_*` variables (`AWS_ENDPOINT` for an
    /// S3-compatible service, `AWS_ALLOW_HTTP=true` for plain HTTP). Records go to `records`, or
    /// into the blob store when `None`. A folder is owned through its lock file, an S3 store not
    /// at all, unless [`Self::owned_by`] says otherwise.
    pub fn open(location: &str, records: Option<Arc<dyn RecordStore>>) -> Result<Self, CoordinatorError> {
        let mut ownership = StoreOwnership::Unguarded;
        let blobs: Arc<dyn ObjectStore> = if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(CoordinatorError::invalid_argument("state", format!("{location}: no bucket (expected s3://BUCKET[/PREFIX])")));
            }
            let s3 = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build().map_err(|e| store_error(location, e))?;
            match prefix.trim_matches('/') {
                "" => Arc::new(s3),
                p => Arc::new(object_store::prefix::PrefixStore::new(s3, p)),
            }
        } else if location.contains("://") {
            return Err(CoordinatorError::invalid_argument("state", format!("{location}: a folder or s3://BUCKET[/PREFIX] (no other scheme)")));
        } else {
            std::fs::create_dir_all(location).map_err(|e| store_error(location, e))?;
            ownership = StoreOwnership::Folder(location.into());
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(location).map_err(|e| store_error(location, e))?)
        };
        Ok(Self { ownership, ..Self::with(blobs, records, location.to_string()) })
    }

    /// The store, owned as `ownership` says (an etcd claim, for a coordinator that follows etcd).
    pub fn owned_by(self, ownership: StoreOwnership) -> Self {
        Self { ownership, ..self }
    }

    /// How the store is owned.
    pub fn ownership(&self) -> &StoreOwnership {
        &self.ownership
    }

    /// A store in memory (tests; nothing outlives the process).
    pub fn in_memory() -> Self {
        Self::with(Arc::new(object_store::memory::InMemory::new()), None, "memory".into())
    }

    fn with(blobs: Arc<dyn ObjectStore>, records: Option<Arc<dyn RecordStore>>, location: String) -> Self {
        let records = records.unwrap_or_else(|| Arc::new(BlobRecords { blobs: blobs.clone(), location: location.clone() }));
        Self { records, blobs, location, ownership: StoreOwnership::Unguarded }
    }

    /// Where the records and the blobs are, for logs.
    pub fn describe(&self) -> String {
        format!("records in {}, blobs in {}, owner lock: {:?}", self.records.describe(), self.location, self.ownership)
    }

    /// Stores (replaces) a job's record.
    pub async fn save(&self, job: &StoredJob) -> Result<(), CoordinatorError> {
        let id = job.job.as_ref().map(|j| j.job_id.as_str()).unwrap_or_default();
        job_dir(id)?;
        self.records.put(id, job.encode_to_vec()).await.map_err(|e| store_error("saving a job record", e))
    }

    /// Every stored record. One that does not decode (or names another job than its key) is
    /// logged and left alone: it must not stop the others from resuming.
    pub async fn load(&self) -> Result<Vec<StoredJob>, CoordinatorError> {
        let mut out = Vec::new();
        for (id, bytes) in self.records.list().await.map_err(|e| store_error("listing the job records", e))? {
            let decoded = (bytes.len() <= MAX_RECORD_BYTES)
                .then(|| StoredJob::decode(bytes.as_slice()).ok())
                .flatten()
                .filter(|s| s.job.as_ref().is_some_and(|j| j.job_id == id) && s.version == STORE_VERSION);
            match decoded {
                Some(s) => out.push(s),
                None => tracing::warn!(job = %id, bytes = bytes.len(), "skipping a stored job record that does not decode (or is of another version)"),
            }
        }
        Ok(out)
    }

    /// The record of job `id`, if stored (and well-formed).
    pub async fn get(&self, id: &str) -> Result<Option<StoredJob>, CoordinatorError> {
        job_dir(id)?;
        let Some(bytes) = self.records.get(id).await.map_err(|e| store_error("reading a job record", e))? else { return Ok(None) };
        Ok((bytes.len() <= MAX_RECORD_BYTES)
            .then(|| StoredJob::decode(bytes.as_slice()).ok())
            .flatten()
            .filter(|s| s.job.as_ref().is_some_and(|j| j.job_id == id)))
    }

    /// Stores one blob of job `id`.
    pub async fn put_blob(&self, id: &str, blob: Blob, bytes: Bytes) -> Result<(), CoordinatorError> {
        let path = BlobPath::from(format!("{}/{}", job_dir(id)?, blob.name()));
        self.blobs.put(&path, PutPayload::from_bytes(bytes)).await.map(drop).map_err(|e| store_error(&format!("writing {path}"), e))
    }

    /// One blob of job `id`, if stored.
    pub async fn get_blob(&self, id: &str, blob: Blob) -> Result<Option<Bytes>, CoordinatorError> {
        let path = BlobPath::from(format!("{}/{}", job_dir(id)?, blob.name()));
        match self.blobs.get(&path).await {
            Ok(got) => got.bytes().await.map(Some).map_err(|e| store_error(&format!("reading {path}"), e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(&format!("reading {path}"), e)),
        }
    }

    /// Deletes a job's record and every blob of it.
    pub async fn forget(&self, id: &str) -> Result<(), CoordinatorError> {
        let dir = BlobPath::from(job_dir(id)?);
        let paths: Vec<BlobPath> = self
            .blobs
            .list(Some(&dir))
            .map(|m| m.map(|m| m.location))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| store_error("listing blobs", e))?;
        for p in paths {
            match self.blobs.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(&format!("deleting {p}"), e)),
            }
        }
        self.records.delete(id).await.map_err(|e| store_error("deleting a job record", e))
    }
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Records kept in the blob store itself, as `records/<id>` (servers without etcd).
struct BlobRecords {
    blobs: Arc<dyn ObjectStore>,
    location: String,
}

fn record_path(id: &str) -> tessera_cluster::Result<BlobPath> {
    tessera_cluster::membership::validate_id("job_id", id)?;
    Ok(BlobPath::from(format!("records/{id}")))
}

fn blob_error(e: impl std::fmt::Display) -> tessera_cluster::ClusterError {
    tessera_cluster::ClusterError::Membership(format!("job records: {e}"))
}

#[async_trait::async_trait]
impl RecordStore for BlobRecords {
    async fn put(&self, id: &str, record: Vec<u8>) -> tessera_cluster::Result<()> {
        self.blobs.put(&record_path(id)?, PutPayload::from(record)).await.map(drop).map_err(blob_error)
    }

    async fn get(&self, id: &str) -> tessera_cluster::Result<Option<Vec<u8>>> {
        match self.blobs.get(&record_path(id)?).await {
            Ok(got) => Ok(Some(got.bytes().await.map_err(blob_error)?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(blob_error(e)),
        }
    }

    async fn delete(&self, id: &str) -> tessera_cluster::Result<()> {
        match self.blobs.delete(&record_path(id)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(blob_error(e)),
        }
    }

    async fn list(&self) -> tessera_cluster::Result<Vec<(String, Vec<u8>)>> {
        let metas: Vec<_> =
            self.blobs.list(Some(&BlobPath::from("records"))).collect::<Vec<_>>().await.into_iter().collect::<Result<_, _>>().map_err(blob_error)?;
        let mut out = Vec::with_capacity(metas.len());
        for meta in metas {
            let Some(id) = meta.location.filename().map(str::to_string) else { continue };
            if meta.size as usize > MAX_RECORD_BYTES {
                tracing::warn!(job = %id, bytes = meta.size, "skipping an oversized job record");
                continue;
            }
            match self.blobs.get(&meta.location).await {
                Ok(got) => out.push((id, got.bytes().await.map_err(blob_error)?.to_vec())),
                // deleted since the listing
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(blob_error(e)),
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("{}/records", self.location)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::v1::Job;

    fn stored(id: &str) -> StoredJob {
        StoredJob { job: Some(Job { job_id: id.into(), ..Default::default() }), version: STORE_VERSION, ..Default::default() }
    }

    #[tokio::test]
    async fn records_and_blobs_round_trip_in_a_folder_and_are_forgotten_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path().join("state").to_str().unwrap(), None).unwrap();
        store.save(&stored("j-1")).await.unwrap();
        store.save(&stored("j-2")).await.unwrap();
        store.put_blob("j-1", Blob::Checkpoint, Bytes::from_static(b"cp")).await.unwrap();
        store.put_blob("j-1", Blob::Output(0), Bytes::from_static(b"video")).await.unwrap();
        // a second handle on the same folder (a restarted coordinator) sees them
        let again = JobStore::open(dir.path().join("state").to_str().unwrap(), None).unwrap();
        let mut ids: Vec<String> = again.load().await.unwrap().into_iter().map(|s| s.job.unwrap().job_id).collect();
        ids.sort();
        assert_eq!(ids, ["j-1", "j-2"]);
        assert_eq!(again.get_blob("j-1", Blob::Output(0)).await.unwrap().as_deref(), Some(&b"video"[..]));
        assert_eq!(again.get_blob("j-2", Blob::Checkpoint).await.unwrap(), None);
        again.forget("j-1").await.unwrap();
        assert_eq!(again.get_blob("j-1", Blob::Checkpoint).await.unwrap(), None);
        assert_eq!(again.load().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn garbage_records_are_skipped_and_ids_cannot_escape_the_store() {
        let store = JobStore::in_memory();
        store.save(&stored("j-ok")).await.unwrap();
        store.records.put("j-bad", b"\xff\xff not a record".to_vec()).await.unwrap();
        // a record under one id naming another job
        store.records.put("j-other", stored("j-ok").encode_to_vec()).await.unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.len(), 1);
        assert!(store.put_blob("../x", Blob::Checkpoint, Bytes::new()).await.is_err());
        assert!(store.save(&stored("a/b")).await.is_err());
        assert!(JobStore::open("ftp://x", None).is_err());
        assert!(JobStore::open("s3://", None).is_err());
    }
}
