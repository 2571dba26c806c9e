//! One coordinator per state store. Before it resumes a store's jobs, a coordinator owns the
//! store: an etcd claim (`/tessera/<cluster>/owners/state-store`, leased like a worker's record)
//! when it follows etcd, else a lock on the folder's `owner.lock`. While another coordinator owns
//! it, this one stands by (health NOT_SERVING) and takes over once the other releases the store at
//! its shutdown, or dies (its lease lapses, or the kernel drops its lock). Two coordinators never
//! adopt, resume or finish the same job. An S3 store without etcd has no lock: the chart runs
//! one coordinator there.
//!
//! A lease is not a fencing token: a coordinator cut off from etcd drives its jobs until it
//! learns that its claim lapsed, and by then the next owner may have adopted them. So the owner
//! has an epoch ([`Fence`]): when it took the store, in milliseconds. Every internal call carries
//! it (`tessera_proto::capability`), each worker remembers the highest it has seen, and a worker
//! answers an earlier owner's calls SUPERSEDED; that owner then stops at once, as when it learns
//! of the lapse itself, and writes nothing more to the store.

use crate::CoordinatorError;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tessera_cluster::membership::{EtcdClaim, EtcdMembership, Membership};
use tokio::sync::watch;

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

/// This coordinator's epoch as owner of its state store, which its workers fence by, and whether
/// a worker said that a later owner has called it.
#[derive(Debug)]
pub struct Fence {
    epoch: AtomicU64,
    superseded: watch::Sender<Option<String>>,
}

impl Default for Fence {
    fn default() -> Self {
        Self { epoch: AtomicU64::new(0), superseded: watch::channel(None).0 }
    }
}

impl Fence {
    /// The epoch the job calls carry: 0 until the store is owned (and without a store: such a
    /// coordinator is never fenced).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Takes the store's ownership as of now (called once the store is owned): the epoch is the
    /// wall clock in milliseconds, past any earlier owner's, since this owner could claim the
    /// store only after that one's lease lapsed, or its process died.
    pub fn owned_now(&self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        // Never 0 (no epoch), never lower than one this process took before.
        let epoch = now.max(self.epoch() + 1);
        self.epoch.store(epoch, Ordering::SeqCst);
        epoch
    }

    /// A worker answered SUPERSEDED: `why` (the first one told is kept).
    pub fn supersede(&self, why: String) {
        self.superseded.send_if_modified(|s| {
            let first = s.is_none();
            if first {
                *s = Some(why);
            }
            first
        });
    }

    /// Waits until a worker has answered SUPERSEDED, and says what it said.
    pub async fn superseded(&self) -> String {
        let mut rx = self.superseded.subscribe();
        let why = rx.wait_for(Option::is_some).await.map(|why| why.clone().unwrap_or_default());
        match why {
            Ok(why) => why,
            Err(_) => std::future::pending().await,
        }
    }

    /// Whether a worker has answered SUPERSEDED.
    pub fn is_superseded(&self) -> bool {
        self.superseded.borrow().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fence_rises_with_each_ownership_and_tells_of_the_first_supersession() {
        let fence = Fence::default();
        assert_eq!(fence.epoch(), 0);
        let first = fence.owned_now();
        assert!(first > 1_700_000_000_000, "milliseconds since 1970: {first}");
        assert!(fence.owned_now() > first, "a second ownership in the same millisecond still rises");
        assert!(!fence.is_superseded());
        let fence = std::sync::Arc::new(fence);
        let waiting = tokio::spawn({
            let fence = fence.clone();
            async move { fence.superseded().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        fence.supersede("epoch 9 > 5".into());
        fence.supersede("a later one".into());
        assert!(fence.is_superseded());
        assert_eq!(waiting.await.unwrap(), "epoch 9 > 5", "the first one told is kept");
    }

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
