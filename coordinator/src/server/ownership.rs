//! One coordinator per state store. Before it resumes a store's jobs, a coordinator owns the
//! store: an etcd claim (`/tessera/<cluster>/owners/state-store`, leased like a worker's record)
//! when it follows etcd, else a lock on the folder's `owner.lock`. While another coordinator owns
//! it, this one stands by (health NOT_SERVING) and takes over once the other releases the store at
//! its shutdown, or dies (its lease lapses, or the kernel drops its lock). Two coordinators never
//! adopt, resume or finish the same job. An S3 store without etcd has no lock: the chart runs
//! one coordinator there.

use crate::CoordinatorError;
use std::path::PathBuf;
use std::time::Duration;
use tessera_cluster::membership::{EtcdClaim, EtcdMembership, Membership};

/// The name of the etcd claim on a cluster's state store.
const CLAIM: &str = "state-store";

/// The lock file in a folder store.
const LOCK_FILE: &str = "owner.lock";

/// How often a standby coordinator tries a folder's lock again.
const FOLDER_RETRY: Duration = Duration::from_secs(1);

/// How a store is owned.
pub enum StoreOwnership {
    /// An etcd claim, as `holder` (the coordinator's host and process).
    Etcd {
        /// The cluster's etcd.
        membership: Box<EtcdMembership>,
        /// Who this coordinator is, as the claim names it.
        holder: String,
    },
    /// A lock on `owner.lock` in the folder.
    Folder(PathBuf),
    /// No lock can be had (an S3 store without etcd).
    Unguarded,
}

/// What a coordinator holds while it owns its store.
pub enum Owned {
    /// The etcd claim.
    Etcd(Box<EtcdClaim>),
    /// The locked file (the lock goes with the process).
    Folder(std::fs::File),
    /// Nothing.
    Unguarded,
}

impl std::fmt::Debug for StoreOwnership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Etcd { membership, holder } => write!(f, "etcd claim {CLAIM} of cluster {} as {holder}", membership.cluster()),
            Self::Folder(dir) => write!(f, "lock {}", dir.join(LOCK_FILE).display()),
            Self::Unguarded => write!(f, "none"),
        }
    }
}

/// Who this process is, for a claim: the host (a pod's name in Kubernetes) and the process id.
pub fn holder_name() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.trim().is_empty()).unwrap_or_else(|| "coordinator".into());
    format!("{host}/{}", std::process::id())
}

impl StoreOwnership {
    /// Waits until this coordinator owns the store, saying once (and when it changes) who owns it
    /// meanwhile. An etcd that does not answer is asked again a heartbeat later; a folder that
    /// cannot be locked is an error.
    pub async fn acquire(&self) -> Result<Owned, CoordinatorError> {
        let mut said: Option<String> = None;
        loop {
            let (held_by, pause) = match self {
                Self::Unguarded => {
                    tracing::warn!("the state store has no owner lock (S3 without etcd): run one coordinator on it");
                    return Ok(Owned::Unguarded);
                }
                Self::Etcd { membership, holder } => match membership.try_claim(CLAIM, holder).await {
                    Ok(Ok(claim)) => return Ok(Owned::Etcd(Box::new(claim))),
                    Ok(Err(other)) => (other, membership.heartbeat().period()),
                    // etcd unreachable for a moment (restarting, say): try again.
                    Err(e) => (format!("unknown (etcd: {e})"), membership.heartbeat().period()),
                },
                Self::Folder(dir) => {
                    let path = dir.join(LOCK_FILE);
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&path)
                        .map_err(|e| CoordinatorError::Store(format!("{}: {e}", path.display())))?;
                    match file.try_lock() {
                        Ok(()) => return Ok(Owned::Folder(file)),
                        Err(std::fs::TryLockError::WouldBlock) => ("another process".to_string(), FOLDER_RETRY),
                        Err(std::fs::TryLockError::Error(e)) => return Err(CoordinatorError::Store(format!("locking {}: {e}", path.display()))),
                    }
                }
            };
            if said.as_deref() != Some(held_by.as_str()) {
                tracing::info!(owner = %held_by, lock = ?self, "another coordinator owns the state store: standing by until it lets go");
                said = Some(held_by);
            }
            tokio::time::sleep(pause).await;
        }
    }
}

impl Owned {
    /// Waits until the store is no longer this coordinator's (its etcd claim lapsed: it was cut
    /// off from etcd for longer than the lease's TTL, and another coordinator may own the store
    /// now) and says why. A lock or no lock is never lost.
    pub async fn lost(&mut self) -> String {
        match self {
            Self::Etcd(claim) => claim.lost().await,
            Self::Folder(_) | Self::Unguarded => std::future::pending().await,
        }
    }

    /// Lets another coordinator own the store now.
    pub async fn release(self) {
        match self {
            Self::Etcd(claim) => {
                if let Err(e) = (*claim).release().await {
                    tracing::warn!(error = %e, "could not release the claim on the state store; it lapses with its lease");
                }
            }
            Self::Folder(file) => {
                let _ = file.unlock();
            }
            Self::Unguarded => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder has one owner at a time: a second coordinator stands by until the first lets go.
    #[tokio::test]
    async fn a_folder_store_has_one_owner_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let lock = StoreOwnership::Folder(dir.path().to_path_buf());
        let first = lock.acquire().await.unwrap();
        let second = tokio::spawn(async move { StoreOwnership::Folder(dir.path().to_path_buf()).acquire().await.map(|_| dir) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "a second owner while the first holds the store");
        first.release().await;
        let taken = tokio::time::timeout(FOLDER_RETRY * 3, second).await.expect("the standby takes over once the owner lets go");
        assert!(taken.unwrap().is_ok());
    }
}
