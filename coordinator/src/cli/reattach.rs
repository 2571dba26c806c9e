//! Following a job across a restart of its coordinator: when a client's stream breaks while the
//! job goes on in a state store, wait for the coordinator to serve again and reattach (WatchJob).

use super::remote::{connect, status_error};
use anyhow::{anyhow, Result};
use std::time::{Duration, Instant};
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{GenerateEvent, GetJobRequest, JobState, WatchJobRequest};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How a client follows its job when its stream breaks (its coordinator restarted, as a rolling
/// update does, and the job outlived it in a state store): for up to `within`, it waits for the
/// coordinator at `server` to serve again, asks for the job, and reattaches with WatchJob, which
/// sends the job's whole output again (the output is written afresh). A job that the coordinator
/// does not know, or that ended in failure, ends the wait at once.
#[derive(Clone, Debug)]
pub struct Reattach {
    /// The coordinator's address.
    pub server: String,
    /// How long to keep trying (zero: never).
    pub within: Duration,
}

/// The default of `--reattach-for`: longer than a coordinator's restart (its grace period and
/// start), so that a rolling update goes unnoticed.
pub const REATTACH_FOR: &str = "5m";

/// What one try of reattaching found.
enum Found {
    /// The job's stream again.
    Stream(Box<tonic::Streaming<GenerateEvent>>),
    /// No use waiting: why.
    Final(anyhow::Error),
    /// Not yet (the coordinator is down or still starting): why.
    Retry(String),
}

impl Reattach {
    /// Whether a stream that ended with `status` may have broken without the job ending: the
    /// coordinator went away (UNAVAILABLE, or the connection lost mid-stream). The job's record
    /// then decides.
    pub(super) fn may_outlive(&self, status: &tonic::Status) -> bool {
        !self.within.is_zero() && matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal)
    }

    /// The job's stream again, once a coordinator at the address serves it; `lost` is how the
    /// last stream ended (the error when the job cannot be reattached).
    pub(super) async fn watch(&self, job_id: &str, lost: tonic::Status) -> Result<tonic::Streaming<GenerateEvent>> {
        let until = Instant::now() + self.within;
        let mut pause = Duration::from_millis(200);
        loop {
            match self.try_watch(job_id).await {
                Found::Stream(s) => return Ok(*s),
                Found::Final(e) => return Err(e.context(status_error(lost))),
                Found::Retry(why) if Instant::now() + pause < until => {
                    tracing::debug!(job = job_id, why, "cannot reattach yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Found::Retry(why) => {
                    return Err(status_error(lost)
                        .context(format!("could not reattach to job {job_id} within {:?} ({why}); `tessera watch {job_id}` reattaches later", self.within)))
                }
            }
        }
    }

    async fn try_watch(&self, job_id: &str) -> Found {
        let channel = match connect(&self.server, "--server").await {
            Ok(c) => c,
            Err(e) => return Found::Retry(format!("{e:#}")),
        };
        // SERVING once the coordinator has taken over its stored jobs: before that it does not
        // know the job yet.
        match HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await {
            Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => {}
            Ok(_) => return Found::Retry("the coordinator is not serving yet".into()),
            Err(s) => return Found::Retry(s.message().to_string()),
        }
        let mut client = TesseraClient::new(channel).max_decoding_message_size(64 << 20);
        let retry_or_final = |s: tonic::Status| match s.code() {
            tonic::Code::Unavailable => Found::Retry(s.message().to_string()),
            _ => Found::Final(status_error(s)),
        };
        let job = match client.get_job(GetJobRequest { job_id: job_id.to_string() }).await {
            Ok(j) => j.into_inner(),
            Err(s) => return retry_or_final(s),
        };
        if matches!(JobState::try_from(job.state), Ok(JobState::Failed | JobState::Cancelled)) {
            return Found::Final(anyhow!("job {job_id} ended: {}", job.error));
        }
        match client.watch_job(WatchJobRequest { job_id: job_id.to_string() }).await {
            Ok(s) => Found::Stream(Box::new(s.into_inner())),
            Err(s) => retry_or_final(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a stream that may have broken with the job still going is followed again, and only
    /// when reattaching is on; the job's own refusals end the command.
    #[test]
    fn only_a_lost_stream_is_followed_again() {
        let on = Reattach { server: "127.0.0.1:1".into(), within: Duration::from_secs(60) };
        let off = Reattach { within: Duration::ZERO, ..on.clone() };
        for code in [tonic::Code::Unavailable, tonic::Code::Unknown, tonic::Code::Internal] {
            let s = tonic::Status::new(code, "gone");
            assert!(on.may_outlive(&s) && !off.may_outlive(&s), "{code:?}");
        }
        for code in
            [tonic::Code::InvalidArgument, tonic::Code::NotFound, tonic::Code::Cancelled, tonic::Code::DeadlineExceeded, tonic::Code::FailedPrecondition]
        {
            assert!(!on.may_outlive(&tonic::Status::new(code, "the job's own end")), "{code:?}");
        }
    }

    /// Nobody at the address within the time: the command ends with the stream's error and says
    /// how to reattach later.
    #[tokio::test]
    async fn a_coordinator_that_never_comes_back_ends_the_wait() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let r = Reattach { server: format!("127.0.0.1:{port}"), within: Duration::from_millis(600) };
        let started = Instant::now();
        let e = r.watch("j-1", tonic::Status::unavailable("the server shut down")).await.expect_err("nobody there");
        let text = format!("{e:#}");
        assert!(text.contains("UNAVAILABLE: the server shut down") && text.contains("tessera watch j-1"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
