//! A job joining the server, accepted from Generate or resumed from the state store after a
//! restart, by one path: its input media decoded once ([`decode_media`]), then ([`launch`]) its
//! durable side stored, its record, its place in the queue, its Accepted message, its feed and
//! its driver.

use super::executor::ExecJob;
use super::feed::event;
use super::input::HeldShare;
use super::jobs::StopSignal;
use super::persist::Persisted;
use super::queue::Admit;
use super::runner::{drive, ClientSender, DriverJob};
use super::ServiceState;
use crate::request::ValidRequest;
use crate::CoordinatorError;
use std::sync::Arc;
use std::time::Instant;
use tessera_proto::capability::JOB_SECRET_BYTES;
use tessera_proto::v1::{generate_event::Event, Accepted, Job};
use tessera_proto::worker::v1::CheckpointResponse;
use tracing::Instrument;

/// The compressed media a request came with, taken out of it once decoded (kept only by the
/// state store).
#[derive(Debug, Default)]
pub struct Media {
    /// The input video's bytes (empty: none).
    pub video: Vec<u8>,
    /// The input image's bytes (empty: none).
    pub image: Vec<u8>,
}

/// Decodes the request's media once: after the queue-full check (not for a queue, or a tenant's
/// share of it, that is full anyway), before the job is accepted (garbage is refused). The frames
/// count against what accepted jobs may hold, until the job's driver ends; the job keeps the
/// frames, and the bytes are handed back. A job accepted before (`Admit::Accepted`,
/// `Admit::Adopted`) is held to neither limit.
pub async fn decode_media(state: &ServiceState, valid: &mut ValidRequest, tenant: &str, admit: Admit) -> Result<(Option<HeldShare>, Media), CoordinatorError> {
    if admit == Admit::New && (!valid.request.input_video.is_empty() || !valid.request.input_image.is_empty()) {
        state.scheduler.check_room(tenant)?;
    }
    let video = super::input::prepare_request_video_blocking(valid, &state.media_decodes).await?;
    let held = valid.video.as_ref().map(|v| state.held_input.take(v.rgb.len() as u64, admit)).transpose()?;
    let mut image = Vec::new();
    if !valid.request.input_image.is_empty() {
        let bytes = std::mem::take(&mut valid.request.input_image);
        if state.store.is_some() {
            image = bytes.clone();
        }
        valid.image = Some(Arc::new(crate::input_image::decode_blocking(bytes).await?));
    }
    let video = if state.store.is_some() { video } else { Vec::new() };
    Ok((held, Media { video, image }))
}

/// A job ready to join the queue.
pub struct Launch {
    /// Its record (state QUEUED; the request as it runs, its plan and seed).
    pub record: Job,
    /// The request, its spec planned.
    pub valid: ValidRequest,
    /// Its capability on its workers.
    pub secret: [u8; JOB_SECRET_BYTES],
    /// Its last checkpoint (a resumed job).
    pub resume: Option<Arc<CheckpointResponse>>,
    /// Its Generate stream (none for a resumed job).
    pub client: Option<ClientSender>,
    /// The client's deadline.
    pub deadline: Option<Instant>,
    /// Its share of the held input frames.
    pub held: Option<HeldShare>,
    /// Its compressed media, for the state store.
    pub media: Media,
    /// When it was accepted (this process's clock).
    pub accepted_at: Instant,
    /// Whether it is stored already (a resumed job): its media is not stored again.
    pub stored: bool,
    /// Whether its run was adopted from the workers that still run it: it leaves the queue
    /// first ([`super::executor::ADOPTED_PRIORITY`]).
    pub adopted: bool,
    /// Its span (the job's trace).
    pub span: tracing::Span,
}

/// Stores, records, queues and starts the job; returns its Accepted message, which its client
/// (if any) has been sent first. Errors (the store unreachable, the queue full) leave nothing
/// behind.
pub async fn launch(state: &Arc<ServiceState>, l: Launch) -> Result<Accepted, CoordinatorError> {
    let id = l.record.job_id.clone();
    let persisted = state.store.as_ref().map(|store| {
        let media = (!l.media.video.is_empty(), !l.media.image.is_empty());
        Persisted::new(store.clone(), &id, l.secret, media, state.output_retention)
    });
    if let Some(p) = &persisted {
        match l.stored {
            false => p.accept(l.record.clone(), l.media.video, l.media.image).await?,
            true => p.save(Some(l.record.clone())).await,
        }
    }
    let stop = StopSignal::default();
    state.jobs.insert(l.record.clone(), stop.clone());
    let priority = if l.adopted { super::executor::ADOPTED_PRIORITY } else { l.valid.request.priority };
    // A stored job was accepted before (by this coordinator or the one before it); an adopted
    // one runs on its workers already.
    let admit = match (l.adopted, l.stored) {
        (true, _) => Admit::Adopted,
        (false, true) => Admit::Accepted,
        (false, false) => Admit::New,
    };
    let (position, admission) = match state.scheduler.enqueue(&id, &l.record.tenant, priority, admit) {
        Ok(q) => q,
        Err(e) => {
            state.jobs.remove(&id);
            if let (Some(p), false) = (&persisted, l.stored) {
                let _ = p.store().forget(&id).await;
            }
            return Err(e);
        }
    };
    let accepted = Accepted {
        job_id: id.clone(),
        plan: l.record.plan.clone(),
        queue_position: position as u32,
        seed: l.record.seed,
        effective_request: l.record.request.clone(),
    };
    if let Some(client) = &l.client {
        client
            .try_send(Ok(event(Event::Accepted(accepted.clone()))))
            .map_err(|_| CoordinatorError::Internal("a new stream refused its first message".into()))?;
    }
    let feed = state.feeds.open(&id, accepted.clone());
    let job = ExecJob { id, request: l.valid, secret: l.secret, resume: l.resume, stored: persisted.is_some(), epoch: state.fence.epoch() };
    let driver = DriverJob {
        job,
        accepted: l.accepted_at,
        client: l.client,
        feed,
        persisted,
        stop,
        deadline: l.deadline,
        send_timeout: state.send_timeout,
        _held_input: l.held,
    };
    tokio::spawn(drive(state.clone(), driver, admission).instrument(l.span));
    Ok(accepted)
}
