//! A coordinator's start on a state store that holds jobs (it, or the coordinator before it,
//! stopped or died with jobs unfinished): finished jobs' records come back, so GetJob and WatchJob
//! serve them until they expire; every unfinished job joins the queue again, oldest first, with
//! its plan, its seed and its last checkpoint, so its video is the one an undisturbed run makes.
//! Its workers may still run it: the executor adopts their run with the job's secret (the job
//! goes on with them from the step they stand at), or releases them.

use super::durable::{Blob, JobStore};
use super::launch::{decode_media, launch, Launch};
use super::persist::forget_later;
use super::queue::Admit;
use super::service::is_final;
use super::ServiceState;
use crate::request::validate;
use crate::CoordinatorError;
use prost::Message;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tessera_cluster::JobPlan;
use tessera_proto::state::v1::StoredJob;
use tessera_proto::v1::{JobState, Phase};
use tessera_proto::worker::v1::CheckpointResponse;

/// Loads the state store (see the module docs); returns how many jobs were resumed.
pub async fn resume_stored(state: &Arc<ServiceState>) -> Result<usize, CoordinatorError> {
    let Some(store) = state.store.clone() else { return Ok(0) };
    let mut stored = store.load().await?;
    stored.sort_by_key(|s| s.job.as_ref().and_then(|j| j.created).map(|t| (t.seconds, t.nanos)));
    let mut resumed = 0;
    for s in stored {
        let Some(job) = s.job.clone() else { continue };
        let id = job.job_id.clone();
        if is_final(job.state) {
            let left = s.expires.and_then(|t| SystemTime::UNIX_EPOCH.checked_add(Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)));
            let left = left.and_then(|t| t.duration_since(SystemTime::now()).ok()).unwrap_or_default();
            if !left.is_zero() {
                state.jobs.restore_finished(job);
            }
            forget_later(store.clone(), id, left);
            continue;
        }
        match resume_one(state, &store, s).await {
            Ok(()) => resumed += 1,
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "a stored job cannot be resumed: it fails");
                let mut failed = job;
                failed.state = JobState::Failed as i32;
                failed.error = format!("resuming after a coordinator restart: {e}");
                failed.finished = Some(super::jobs::pb_timestamp(SystemTime::now()));
                let expires = SystemTime::now() + state.output_retention;
                let record = StoredJob { job: Some(failed.clone()), expires: Some(super::jobs::pb_timestamp(expires)), ..Default::default() };
                let record = StoredJob { version: super::durable::STORE_VERSION, ..record };
                if let Err(e) = store.save(&record).await {
                    tracing::warn!(job = %failed.job_id, error = %e, "cannot store the failed job's record");
                }
                forget_later(store.clone(), failed.job_id.clone(), state.output_retention);
                state.jobs.restore_finished(failed);
            }
        }
    }
    Ok(resumed)
}

/// Puts one unfinished stored job back in the queue.
async fn resume_one(state: &Arc<ServiceState>, store: &JobStore, s: StoredJob) -> Result<(), CoordinatorError> {
    let mut record = s.job.ok_or_else(|| CoordinatorError::Store("a record without its job".into()))?;
    let id = record.job_id.clone();
    let mut request = record.request.clone().ok_or_else(|| CoordinatorError::Store(format!("job {id}: the record has no request")))?;
    let missing = |what: &str| CoordinatorError::Store(format!("job {id}: its {what} is missing from the state store"));
    if s.has_input_video {
        request.input_video = store.get_blob(&id, Blob::InputVideo).await?.ok_or_else(|| missing("input video"))?.to_vec();
    }
    if s.has_input_image {
        request.input_image = store.get_blob(&id, Blob::InputImage).await?.ok_or_else(|| missing("input image"))?.to_vec();
    }
    let secret: [u8; tessera_proto::capability::JOB_SECRET_BYTES] =
        s.job_secret.as_slice().try_into().map_err(|_| CoordinatorError::Store(format!("job {id}: the stored secret has {} bytes", s.job_secret.len())))?;
    let plan = record.plan.clone().ok_or_else(|| CoordinatorError::Store(format!("job {id}: the record has no plan")))?;
    // The request as it was accepted (defaults applied, seed set) is checked again: the served
    // models may have changed since.
    let exec = &state.executor;
    let seed = record.seed;
    let mut valid = validate(request, &exec.defaults(), &exec.models(), exec.max_tokens(), move || seed)?;
    exec.check(&valid)?;
    let (held, media) = decode_media(state, &mut valid, &record.tenant, Admit::Accepted).await?;
    // The plan it was accepted with: the same layout gives the same video.
    valid.spec = valid.spec.clone().planned(JobPlan { ranks: plan.ranks, ulysses: plan.ulysses, cfg_parallel: plan.cfg_parallel })?;
    let resume = match store.get_blob(&id, Blob::Checkpoint).await? {
        Some(bytes) => {
            Some(Arc::new(CheckpointResponse::decode(bytes).map_err(|e| CoordinatorError::Store(format!("job {id}: its checkpoint does not decode: {e}")))?))
        }
        None => None,
    };
    record.state = JobState::Queued as i32;
    if let Some(p) = &mut record.progress {
        p.phase = Phase::Queued as i32;
    }
    // Its workers may still run it (the coordinator before died mid-job): it goes on with them
    // where they stand, or they are freed (else they would wait for their idle timeout, and the
    // job for them) and it resumes from its checkpoint.
    let orphan = super::executor::ExecJob { id: id.clone(), request: valid.clone(), secret, resume: None, stored: true, epoch: state.fence.epoch() };
    let adopted = state.executor.take_over_orphans(&orphan).await;
    let from_step = adopted.unwrap_or_else(|| resume.as_ref().map_or(0, |c| c.steps_done));
    tracing::info!(job = %id, from_step, adopted = adopted.is_some(), "resuming a stored job");
    let span = tracing::info_span!("job", job_id = %id, model = %valid.request.model, resumed = true, from_step);
    let job = Launch {
        record,
        valid,
        secret,
        resume,
        client: None,
        deadline: None,
        held,
        media,
        accepted_at: Instant::now(),
        stored: true,
        adopted: adopted.is_some(),
        span,
    };
    let launched = launch(state, job).await.map(drop);
    if launched.is_err() {
        state.executor.abandon(&orphan);
    }
    launched
}
