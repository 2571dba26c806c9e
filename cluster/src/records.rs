//! Where a coordinator keeps its jobs' records so that they outlive it: a [`RecordStore`] holds
//! one opaque record per job id (the coordinator's `StoredJob`). [`EtcdRecords`] keeps them in etcd
//! under `/tessera/<cluster>/jobs/<id>`, beside the workers' membership; the coordinator has a
//! second implementation over its blob store for servers without etcd.

use crate::membership::validate_id;
use crate::{ClusterError, Result};
use etcd_client::{Client, GetOptions};
use std::time::Duration;

/// Records listed per etcd request (a record is a few KB; etcd answers at most a few MB).
const PAGE: i64 = 100;

/// Job records by id. Object safe: hold it as `Arc<dyn RecordStore>`.
#[async_trait::async_trait]
pub trait RecordStore: Send + Sync {
    /// Stores (or replaces) the record of job `id`.
    async fn put(&self, id: &str, record: Vec<u8>) -> Result<()>;
    /// The record of job `id`, if stored.
    async fn get(&self, id: &str) -> Result<Option<Vec<u8>>>;
    /// Deletes the record of job `id` (none is not an error).
    async fn delete(&self, id: &str) -> Result<()>;
    /// Every record, with its job id.
    async fn list(&self) -> Result<Vec<(String, Vec<u8>)>>;
    /// Where the records live, for logs and errors.
    fn describe(&self) -> String;
}

/// The key prefix of a cluster's job records: `/tessera/<cluster>/jobs/`.
pub fn jobs_prefix(cluster: &str) -> String {
    format!("/tessera/{cluster}/jobs/")
}

/// Job records in etcd (see the module docs); every call is bounded by `timeout`.
#[derive(Clone)]
pub struct EtcdRecords {
    client: Client,
    prefix: String,
    endpoints: String,
    timeout: Duration,
}

impl EtcdRecords {
    /// Records of `cluster` through an etcd `client` already connected to `endpoints`.
    pub fn new(client: Client, cluster: &str, endpoints: &str, timeout: Duration) -> Result<Self> {
        validate_id("cluster", cluster)?;
        Ok(Self { client, prefix: jobs_prefix(cluster), endpoints: endpoints.to_string(), timeout })
    }

    async fn call<T>(&self, what: &str, request: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(ClusterError::Membership(format!("etcd {}: job records: {what}: {e}", self.endpoints))),
            Err(_) => Err(ClusterError::Membership(format!("etcd {}: job records: {what}: no answer within {:?}", self.endpoints, self.timeout))),
        }
    }

    fn key(&self, id: &str) -> Result<String> {
        validate_id("job_id", id)?;
        Ok(format!("{}{id}", self.prefix))
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end of a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[async_trait::async_trait]
impl RecordStore for EtcdRecords {
    async fn put(&self, id: &str, record: Vec<u8>) -> Result<()> {
        let key = self.key(id)?;
        let mut kv = self.client.kv_client();
        self.call("put", kv.put(key, record, None)).await.map(drop)
    }

    async fn get(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let key = self.key(id)?;
        let mut kv = self.client.kv_client();
        let got = self.call("get", kv.get(key, None)).await?;
        Ok(got.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let key = self.key(id)?;
        let mut kv = self.client.kv_client();
        self.call("delete", kv.delete(key, None)).await.map(drop)
    }

    async fn list(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut kv = self.client.kv_client();
        let end = prefix_end(&self.prefix);
        let mut from = self.prefix.as_bytes().to_vec();
        let mut out = Vec::new();
        loop {
            let page = self.call("list", kv.get(from.clone(), Some(GetOptions::new().with_range(end.clone()).with_limit(PAGE)))).await?;
            for kv in page.kvs() {
                let id = kv.key().strip_prefix(self.prefix.as_bytes()).and_then(|id| std::str::from_utf8(id).ok());
                match id.filter(|id| validate_id("job_id", id).is_ok()) {
                    Some(id) => out.push((id.to_string(), kv.value().to_vec())),
                    None => tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "skipping a malformed job record key"),
                }
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    fn describe(&self) -> String {
        format!("etcd {} under {}", self.endpoints, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(prefix_end("/tessera/c/jobs/"), b"/tessera/c/jobs0");
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
        assert_eq!(jobs_prefix("prod"), "/tessera/prod/jobs/");
    }
}
