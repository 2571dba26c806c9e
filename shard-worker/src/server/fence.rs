//! The coordinator epochs a worker has been called with (`tessera_proto::capability`): a call of
//! a lower nonzero epoch than the highest one an admitted call carried comes from a coordinator
//! that lost its state store to a later one, and is refused (SUPERSEDED) before anything else is
//! looked at, so that such a coordinator learns it at once, whatever it asks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tessera_proto::capability::{coordinator_epoch, COORDINATOR_EPOCH_KEY};
use tessera_proto::reason::{invalid_field, status, Reason};
use tonic::metadata::MetadataMap;
use tonic::Status;

/// How far past this worker's clock an epoch may be (the clock skew allowed between hosts, as
/// Kerberos allows 5 minutes): a call claiming a later one is refused. Whoever can call the
/// internal API can fence the coordinators out, as it can occupy the workers (mutual TLS keeps
/// strangers off the port); this bounds a forged epoch's effect to this long, where `u64::MAX`
/// would last until the worker restarts.
pub const EPOCH_AHEAD_LIMIT: Duration = Duration::from_secs(5 * 60);

/// The highest coordinator epoch of the worker's admitted calls.
#[derive(Debug, Default)]
pub struct EpochFence {
    highest: AtomicU64,
}

impl EpochFence {
    /// The epoch `metadata` carries (0: none), refused when a later coordinator has called
    /// (SUPERSEDED), when malformed or when too far ahead of this worker's clock (INVALID_ARGUMENT
    /// naming the metadata entry).
    pub fn check(&self, metadata: &MetadataMap) -> Result<u64, Status> {
        let epoch = coordinator_epoch(metadata).map_err(|detail| invalid_field(COORDINATOR_EPOCH_KEY, detail))?;
        if epoch == 0 {
            return Ok(0);
        }
        let highest = self.highest.load(Ordering::SeqCst);
        if epoch < highest {
            return Err(status(
                Reason::Superseded,
                None,
                format!(
                    "a coordinator that took the state store later (epoch {highest}) drives this worker now; the calling coordinator (epoch {epoch}) no longer owns it"
                ),
            ));
        }
        let limit = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + EPOCH_AHEAD_LIMIT;
        if u128::from(epoch) > limit.as_millis() {
            return Err(invalid_field(
                COORDINATOR_EPOCH_KEY,
                format!("{COORDINATOR_EPOCH_KEY}: {epoch} ms is more than {EPOCH_AHEAD_LIMIT:?} past this worker's clock"),
            ));
        }
        Ok(epoch)
    }

    /// Remembers the epoch of a call that was admitted (it carried the job's secret, or prepared
    /// a job): from now on, lower ones are refused.
    pub fn raise(&self, epoch: u64) {
        self.highest.fetch_max(epoch, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::capability::JobSecret;
    use tessera_proto::reason::has_reason;
    use tonic::service::Interceptor;

    fn call(epoch: u64) -> MetadataMap {
        JobSecret::new(&[3; 32]).with_epoch(epoch).call(tonic::Request::new(())).unwrap().metadata().clone()
    }

    fn now_ms() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
    }

    #[test]
    fn a_later_coordinator_fences_out_an_earlier_one() {
        let fence = EpochFence::default();
        let (old, new) = (now_ms() - 60_000, now_ms());
        assert_eq!(fence.check(&call(old)).unwrap(), old);
        fence.raise(old);
        // Checked but not admitted (no job secret, say): nothing is fenced.
        assert_eq!(fence.check(&call(new)).unwrap(), new);
        assert_eq!(fence.check(&call(old)).unwrap(), old);
        fence.raise(new);
        let refused = fence.check(&call(old)).unwrap_err();
        assert!(has_reason(&refused, Reason::Superseded), "{refused:?}");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains(&new.to_string()) && refused.message().contains(&old.to_string()), "{}", refused.message());
        // The later one goes on; a coordinator without a store (epoch 0) is never fenced.
        assert_eq!(fence.check(&call(new)).unwrap(), new);
        assert_eq!(fence.check(&call(0)).unwrap(), 0);
        fence.raise(old);
        assert!(fence.check(&call(old)).is_err(), "raising never lowers");
    }

    #[test]
    fn malformed_or_far_future_epochs_are_refused_naming_the_entry() {
        let fence = EpochFence::default();
        let far = now_ms() + EPOCH_AHEAD_LIMIT.as_millis() as u64 + 3_600_000;
        for metadata in [call(far), call(u64::MAX), {
            let mut m = MetadataMap::new();
            m.insert(COORDINATOR_EPOCH_KEY, "soon".parse().unwrap());
            m
        }] {
            let e = fence.check(&metadata).unwrap_err();
            assert!(has_reason(&e, Reason::InvalidField) && e.message().contains(COORDINATOR_EPOCH_KEY), "{e:?}");
        }
        assert_eq!(fence.highest.load(Ordering::SeqCst), 0);
    }
}
