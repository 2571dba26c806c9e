//! A worker's presence in membership over its life: the record it wants stored, its live
//! registration, and the loop that keeps the two in step with the worker service (idle ↔ busy as
//! jobs start and end, registering again after a lost lease), until shutdown.

use super::{Membership, Registration, WorkerRecord, WorkerState};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;

/// The record a worker wants stored and its registration (when it has one).
pub struct Presence {
    membership: Option<Arc<dyn Membership>>,
    registration: Option<Registration>,
    record: WorkerRecord,
}

impl Presence {
    /// Registers `record` in `membership` (or stays unregistered without one). Fails when the
    /// first registration fails (the worker should not start unseen).
    pub async fn register(membership: Option<Arc<dyn Membership>>, record: WorkerRecord) -> crate::Result<Self> {
        let registration = match &membership {
            Some(m) => Some(m.register(record.clone()).await?),
            None => None,
        };
        Ok(Self { membership, registration, record })
    }

    /// The record as the worker wants it stored.
    pub fn record(&self) -> &WorkerRecord {
        &self.record
    }

    /// Changes the record with `f` and stores it (registering again when the lease was lost);
    /// on failure the registration is dropped, to be retried by [`Presence::follow`].
    pub async fn set(&mut self, f: impl FnOnce(&mut WorkerRecord)) {
        f(&mut self.record);
        let Some(m) = &self.membership else { return };
        if let Some(r) = self.registration.as_mut() {
            match r.replace(self.record.clone()).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "updating the membership record failed; registering again"),
            }
        }
        self.registration = None;
        match m.register(self.record.clone()).await {
            Ok(r) => self.registration = Some(r),
            Err(e) => tracing::warn!(error = %e, "registering failed; retrying at the next heartbeat"),
        }
    }

    /// Stores `state` with `job`.
    pub async fn set_state(&mut self, state: WorkerState, job: Option<String>) {
        self.set(|r| {
            r.state = state;
            r.job_id = job;
        })
        .await;
    }

    async fn lost(&mut self) -> String {
        match self.registration.as_mut() {
            Some(r) => r.lost().await.to_string(),
            None => std::future::pending().await,
        }
    }

    fn needs_retry(&self) -> bool {
        self.membership.is_some() && self.registration.is_none()
    }

    /// Follows the job the worker runs (`running`: `None` when idle) into the record's state
    /// (busy/idle), re-registering after a lost lease and retrying failed registrations every
    /// heartbeat, until `shutdown` resolves.
    pub async fn follow(&mut self, running: &mut watch::Receiver<Option<String>>, shutdown: impl Future<Output = ()>) {
        enum Event {
            Shutdown,
            Running(Option<String>),
            LeaseLost(String),
            Retry,
        }
        tokio::pin!(shutdown);
        let period = self.membership.as_ref().map_or(super::HEARTBEAT, |m| m.heartbeat().period());
        let mut retry = tokio::time::interval(period);
        loop {
            let event = tokio::select! {
                _ = &mut shutdown => Event::Shutdown,
                changed = running.changed() => match changed {
                    Ok(()) => Event::Running(running.borrow_and_update().clone()),
                    Err(_) => Event::Shutdown,
                },
                reason = self.lost() => Event::LeaseLost(reason),
                _ = retry.tick(), if self.needs_retry() => Event::Retry,
            };
            match event {
                Event::Shutdown => return,
                Event::Running(job) => {
                    let state = if job.is_some() { WorkerState::Busy } else { WorkerState::Idle };
                    self.set_state(state, job).await;
                }
                Event::LeaseLost(reason) => {
                    tracing::warn!(%reason, "the membership lease was lost; registering again");
                    self.registration = None;
                    self.set(|_| {}).await;
                }
                Event::Retry => self.set(|_| {}).await,
            }
        }
    }

    /// Leaves membership at once (revokes the lease); a no-op without a registration.
    pub async fn leave(&mut self) {
        if let Some(r) = self.registration.take() {
            match r.revoke().await {
                Ok(()) => tracing::info!("membership lease revoked"),
                Err(e) => tracing::warn!(error = %e, "revoking the lease failed (it lapses by itself)"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Heartbeat, MemoryMembership};
    use std::time::Duration;

    #[tokio::test]
    async fn the_record_follows_the_running_job_and_leaving_removes_it() {
        let m: Arc<dyn Membership> = Arc::new(MemoryMembership::new(Heartbeat::new(Duration::from_millis(20)).unwrap()));
        let record = WorkerRecord::starting("w0", "a:1", "a:2", "tiny", vec!["cpu".into()], 0);
        let mut p = Presence::register(Some(m.clone()), record).await.unwrap();
        p.set_state(WorkerState::Idle, None).await;
        let (tx, mut rx) = watch::channel(None);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let follower = tokio::spawn(async move {
            p.follow(&mut rx, async {
                let _ = stop_rx.await;
            })
            .await;
            p
        });
        let state = |m: Arc<dyn Membership>| async move { m.list().await.unwrap().workers.first().map(|w| (w.state, w.job_id.clone())) };
        tx.send_replace(Some("job-1".into()));
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while state(m.clone()).await != Some((WorkerState::Busy, Some("job-1".into()))) {
            assert!(std::time::Instant::now() < until, "never busy");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx.send_replace(None);
        while state(m.clone()).await != Some((WorkerState::Idle, None)) {
            assert!(std::time::Instant::now() < until, "never idle again");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop_tx.send(()).unwrap();
        let mut p = follower.await.unwrap();
        p.leave().await;
        assert!(m.list().await.unwrap().workers.is_empty());
    }
}
