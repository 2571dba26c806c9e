//! Taking over the runs of a coordinator that died: the workers that still hold a stored job
//! answer AdoptJob with their rank and where their run stands; the run is adopted where it stands
//! when they make one run of the job's plan, else released (the job then resumes from its
//! checkpoint).

use super::super::executor::ExecJob;
use super::drive::{connect, release, Rank, RELEASE_LIMIT};
use std::time::{Duration, Instant};
use tessera_cluster::membership::WorkerRecord;
use tessera_cluster::tls::InternalTls;
use tessera_proto::capability::JobSecret;
use tessera_proto::worker::v1 as pb;

/// How long taking a job over may take.
#[derive(Clone, Copy, Debug)]
struct AdoptTiming {
    /// Connecting, and each rank's answer (which does not wait for a step in flight). A rank
    /// that does not answer in time makes the job resume from its checkpoint instead.
    limit: Duration,
    /// How long to wait for a command other than a step (a checkpoint or a decode the earlier
    /// coordinator sent every rank) to finish, asking the ranks again every `poll`, before the
    /// job resumes from its checkpoint instead (which costs up to `--checkpoint-every` steps).
    settle: Duration,
    /// How often the ranks are asked again meanwhile.
    poll: Duration,
}

/// A coordinator resumes its stored jobs one after another as it starts, so the wait for a
/// command in flight is short: a checkpoint's gather takes seconds.
const ADOPT: AdoptTiming = AdoptTiming { limit: Duration::from_secs(5), settle: Duration::from_secs(10), poll: Duration::from_millis(200) };

/// Where an adopted run stands, as every rank of its group reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adopted {
    /// Steps run: the next Step is this one.
    pub steps_done: u32,
    /// Steps of the run.
    pub total_steps: u32,
}

/// Takes `job` over from `holders`, the workers that still run it for a coordinator that died:
/// each answers AdoptJob (the job's secret proves the right) with its rank and where its run
/// stands. Returns the workers in rank order and where the run stands when they are exactly the
/// `plan`'s ranks, every rank once, agreeing on the step; `None` otherwise (the caller releases
/// them and resumes from the checkpoint). Ranks that would agree once a checkpoint or decode in
/// flight finishes ([`settles`]) are asked again, for up to [`ADOPT`]'s `settle`.
pub async fn adopt_on(
    holders: &[WorkerRecord],
    job: &ExecJob,
    plan: tessera_cluster::JobPlan,
    tls: Option<&InternalTls>,
) -> Option<(Vec<WorkerRecord>, Adopted)> {
    let caller = JobSecret::new(&job.secret).with_epoch(job.epoch);
    adopt_within(holders, &job.id, &caller, plan.ranks, tls, ADOPT).await
}

/// [`adopt_on`] for job `id` on a group of `size` ranks, calling as `caller`, within `timing`.
async fn adopt_within(
    holders: &[WorkerRecord],
    id: &str,
    caller: &JobSecret,
    size: u32,
    tls: Option<&InternalTls>,
    timing: AdoptTiming,
) -> Option<(Vec<WorkerRecord>, Adopted)> {
    if holders.len() != size as usize {
        tracing::info!(job = %id, holders = holders.len(), ranks = size, "not every rank of the job is still held: it cannot be adopted");
        return None;
    }
    let connects = holders.iter().map(|w| connect(w, timing.limit, caller, tls));
    let mut ranks: Vec<Rank> = futures_util::future::join_all(connects)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .inspect_err(|e| tracing::info!(job = %id, error = %e, "a rank of the job cannot be reached"))
        .ok()?;
    let until = Instant::now() + timing.settle;
    loop {
        let calls = ranks.iter_mut().map(|rank| async move {
            let call = rank.client.adopt_job(pb::AdoptJobRequest { job_id: id.to_string() });
            match tokio::time::timeout(timing.limit, call).await {
                Ok(Ok(answer)) => Some((rank.record.clone(), answer.into_inner())),
                outcome => {
                    tracing::info!(worker = %rank.record.worker_id, job = %id, ?outcome, "a rank of the job does not answer AdoptJob");
                    None
                }
            }
        });
        let mut answers: Vec<(WorkerRecord, pb::AdoptJobResponse)> = futures_util::future::join_all(calls).await.into_iter().collect::<Option<_>>()?;
        answers.sort_by_key(|(_, a)| a.rank);
        let steps: Vec<AdoptAnswer> = answers.iter().map(|(_, a)| AdoptAnswer::from(a)).collect();
        if let Some(steps_done) = adoptable(&steps, size) {
            let adopted = Adopted { steps_done, total_steps: answers[0].1.total_steps };
            return Some((answers.into_iter().map(|(w, _)| w).collect(), adopted));
        }
        if !settles(&steps, size) || Instant::now() >= until {
            tracing::info!(job = %id, answers = ?answers.iter().map(|(_, a)| a).collect::<Vec<_>>(), "the ranks of the job disagree: it cannot be adopted");
            return None;
        }
        tracing::debug!(job = %id, "a rank of the job still runs a checkpoint or decode: asking again");
        tokio::time::sleep(timing.poll).await;
    }
}

/// One rank's AdoptJob answer, as [`adoptable`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AdoptAnswer {
    rank: u32,
    ranks: u32,
    steps_done: u32,
    total_steps: u32,
    chunks_done: u32,
    /// 0 idle, 1 running step `steps_done`, 2 running another command.
    busy: u32,
}

impl From<&pb::AdoptJobResponse> for AdoptAnswer {
    fn from(a: &pb::AdoptJobResponse) -> Self {
        Self { rank: a.rank, ranks: a.ranks, steps_done: a.steps_done, total_steps: a.total_steps, chunks_done: a.chunks_done, busy: a.busy }
    }
}

/// Whether answers that [`adoptable`] refuses may turn adoptable by themselves: every rank of the
/// run once, all at the same step and none in a step, some running another command (a
/// checkpoint or decode the earlier coordinator sent). Sent to every rank, it finishes and
/// leaves the ranks idle where they stand; sent to some only, it waits for the others until the
/// caller gives up.
fn settles(answers: &[AdoptAnswer], ranks: u32) -> bool {
    let Some(first) = answers.first() else { return false };
    answers.len() == ranks as usize
        && answers
            .iter()
            .enumerate()
            .all(|(i, a)| a.rank == i as u32 && a.ranks == ranks && a.total_steps == first.total_steps && a.steps_done == first.steps_done && a.busy != 1)
        && answers.iter().any(|a| a.busy == 2)
}

/// The step an adopted run goes on from, when the answers (in rank order) make one run of a
/// group of `ranks`: every rank once, the same total, no rank in a command other than a step.
/// The run stands at the most steps any rank has done, `m`. A rank with fewer has done `m − 1`
/// and is running step `m − 1`: its peers finished that step with it. A rank may also be running
/// step `m`, which the dead coordinator sent it; it answers the first Step (`m`) with that step's
/// report once it is done, and its peers run step `m` with it. Ranks at `m` agree on the chunks
/// done.
fn adoptable(answers: &[AdoptAnswer], ranks: u32) -> Option<u32> {
    let first = answers.first()?;
    let m = answers.iter().map(|a| a.steps_done).max()?;
    let at_m: Vec<&AdoptAnswer> = answers.iter().filter(|a| a.steps_done == m).collect();
    let agree = answers.len() == ranks as usize
        && answers.iter().enumerate().all(|(i, a)| {
            a.rank == i as u32
                && a.ranks == ranks
                && a.total_steps == first.total_steps
                && a.busy != 2
                && (a.steps_done == m || (a.steps_done + 1 == m && a.busy == 1))
        })
        && at_m.iter().all(|a| a.chunks_done == at_m[0].chunks_done);
    (agree && m <= first.total_steps).then_some(m)
}

/// Releases `job` on `workers` that still hold it from an earlier coordinator (best effort).
pub async fn release_on(workers: &[WorkerRecord], job: &ExecJob, tls: Option<&InternalTls>) {
    let interceptor = JobSecret::new(&job.secret).with_epoch(job.epoch);
    let mut ranks = Vec::with_capacity(workers.len());
    for w in workers {
        match connect(w, RELEASE_LIMIT, &interceptor, tls).await {
            Ok(rank) => ranks.push(rank),
            Err(e) => tracing::debug!(worker = %w.worker_id, job = %job.id, error = %e, "cannot reach a worker to release the job"),
        }
    }
    release(&ranks, &job.id).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tessera_proto::worker::v1::shard_worker_server::{ShardWorker, ShardWorkerServer};
    use tonic::{Request, Response, Status};

    /// A worker that answers AdoptJob from a script, one answer per call and the last one from
    /// then on, counting the calls; it refuses every other call.
    struct ScriptedWorker {
        answers: Mutex<VecDeque<pb::AdoptJobResponse>>,
        calls: Arc<AtomicUsize>,
    }

    fn refused<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("a scripted worker answers AdoptJob only"))
    }

    #[tonic::async_trait]
    impl ShardWorker for ScriptedWorker {
        type DecodeStream = futures_util::stream::Empty<Result<pb::DecodedFrames, Status>>;
        async fn create_nccl_id(&self, _: Request<pb::CreateNcclIdRequest>) -> Result<Response<pb::CreateNcclIdResponse>, Status> {
            refused()
        }
        async fn prepare_job(&self, _: Request<pb::PrepareJobRequest>) -> Result<Response<pb::PrepareJobResponse>, Status> {
            refused()
        }
        async fn step(&self, _: Request<pb::StepRequest>) -> Result<Response<pb::StepResponse>, Status> {
            refused()
        }
        async fn checkpoint(&self, _: Request<pb::CheckpointRequest>) -> Result<Response<pb::CheckpointResponse>, Status> {
            refused()
        }
        async fn decode(&self, _: Request<pb::DecodeRequest>) -> Result<Response<Self::DecodeStream>, Status> {
            refused()
        }
        async fn fetch_latents(&self, _: Request<pb::FetchLatentsRequest>) -> Result<Response<pb::JobLatents>, Status> {
            refused()
        }
        async fn release_job(&self, _: Request<pb::ReleaseJobRequest>) -> Result<Response<pb::ReleaseJobResponse>, Status> {
            refused()
        }
        async fn adopt_job(&self, _: Request<pb::AdoptJobRequest>) -> Result<Response<pb::AdoptJobResponse>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut answers = self.answers.lock().unwrap();
            let answer = if answers.len() > 1 { answers.pop_front() } else { answers.front().cloned() };
            answer.map(Response::new).ok_or_else(|| Status::not_found("no run"))
        }
        async fn describe(&self, _: Request<pb::DescribeRequest>) -> Result<Response<pb::DescribeResponse>, Status> {
            refused()
        }
    }

    /// A scripted worker serving on loopback: its record and its count of AdoptJob calls.
    async fn scripted(id: &str, answers: Vec<pb::AdoptJobResponse>) -> (WorkerRecord, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let calls = Arc::new(AtomicUsize::new(0));
        let worker = ScriptedWorker { answers: Mutex::new(answers.into()), calls: calls.clone() };
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(tonic::transport::Server::builder().add_service(ShardWorkerServer::new(worker)).serve_with_incoming(incoming));
        (WorkerRecord::starting(id, address, "127.0.0.1:1", "m", vec!["cpu".into()], 0), calls)
    }

    /// Over gRPC: ranks busy with a checkpoint their dead coordinator sent every rank are asked
    /// again until it ends, and the run is adopted where it stands; a rank that stays busy (the
    /// command reached it alone) is given up on after the settle time; ranks that disagree
    /// otherwise are given up on at once.
    #[tokio::test]
    async fn ranks_finishing_a_checkpoint_are_waited_for_and_adopted() {
        let at = |rank: u32, steps_done: u32, busy: u32| pb::AdoptJobResponse { rank, ranks: 2, steps_done, total_steps: 10, chunks_done: 0, busy };
        let timing = AdoptTiming { limit: Duration::from_secs(5), settle: Duration::from_secs(2), poll: Duration::from_millis(20) };
        let caller = JobSecret::new(&[7u8; 32]);

        // The checkpoint ends on both ranks after a few answers: adopted at step 4.
        let (w0, c0) = scripted("w0", vec![at(0, 4, 2), at(0, 4, 2), at(0, 4, 2), at(0, 4, 0)]).await;
        let (w1, c1) = scripted("w1", vec![at(1, 4, 2), at(1, 4, 0)]).await;
        // Holders in any order: the answers put them in rank order.
        let (workers, adopted) = adopt_within(&[w1.clone(), w0.clone()], "job", &caller, 2, None, timing).await.expect("adopted once the checkpoint ended");
        assert_eq!(adopted, Adopted { steps_done: 4, total_steps: 10 });
        assert_eq!(workers.iter().map(|w| w.worker_id.as_str()).collect::<Vec<_>>(), ["w0", "w1"]);
        assert_eq!((c0.load(Ordering::SeqCst), c1.load(Ordering::SeqCst)), (4, 4), "asked until every rank was idle");

        // Rank 0 stays in a checkpoint its peer never got: given up on after the settle time.
        let (w0, c0) = scripted("w0", vec![at(0, 4, 2)]).await;
        let (w1, _) = scripted("w1", vec![at(1, 4, 0)]).await;
        let started = Instant::now();
        assert_eq!(adopt_within(&[w0, w1], "job", &caller, 2, None, timing).await.map(|(_, a)| a), None);
        let waited = started.elapsed();
        assert!(waited >= timing.settle && waited < timing.settle * 3, "gave up after {waited:?}");
        assert!(c0.load(Ordering::SeqCst) > 10, "asked again meanwhile");

        // Ranks two steps apart: not one run, given up on at the first answers.
        let (w0, c0) = scripted("w0", vec![at(0, 6, 0)]).await;
        let (w1, _) = scripted("w1", vec![at(1, 4, 2)]).await;
        assert_eq!(adopt_within(&[w0, w1], "job", &caller, 2, None, timing).await.map(|(_, a)| a), None);
        assert_eq!(c0.load(Ordering::SeqCst), 1);

        // A rank that holds no run (NOT_FOUND), or holders short of the plan's ranks: none.
        let (w0, _) = scripted("w0", vec![at(0, 4, 0)]).await;
        let (w1, _) = scripted("w1", vec![]).await;
        assert_eq!(adopt_within(&[w0.clone(), w1], "job", &caller, 2, None, timing).await.map(|(_, a)| a), None);
        assert_eq!(adopt_within(&[w0], "job", &caller, 2, None, timing).await.map(|(_, a)| a), None);
    }

    /// A run is adopted where it stands, even with a step of its dead coordinator still running on
    /// some ranks; what cannot be one run is not.
    #[test]
    fn a_run_is_adopted_where_its_ranks_stand() {
        let at = |rank: u32, steps_done: u32, busy: u32| AdoptAnswer { rank, ranks: 3, steps_done, total_steps: 10, chunks_done: 0, busy };
        // Idle at a step boundary (a coordinator's shutdown): go on from there.
        assert_eq!(adoptable(&[at(0, 4, 0), at(1, 4, 0), at(2, 4, 0)], 3), Some(4));
        // Step 4 sent to every rank (or to some) and still running: Step 4 first; a rank that ran
        // it answers with its report.
        assert_eq!(adoptable(&[at(0, 4, 1), at(1, 4, 1), at(2, 4, 1)], 3), Some(4));
        assert_eq!(adoptable(&[at(0, 4, 1), at(1, 4, 0), at(2, 4, 0)], 3), Some(4));
        // One rank finished step 4, the others are finishing it.
        assert_eq!(adoptable(&[at(0, 5, 0), at(1, 4, 1), at(2, 4, 1)], 3), Some(5));
        // A rank behind and idle, two steps apart, a checkpoint or decode running, a rank
        // missing or twice, another total: not one run.
        assert_eq!(adoptable(&[at(0, 5, 0), at(1, 4, 0), at(2, 5, 0)], 3), None);
        assert_eq!(adoptable(&[at(0, 6, 0), at(1, 4, 1), at(2, 6, 0)], 3), None);
        assert_eq!(adoptable(&[at(0, 4, 2), at(1, 4, 0), at(2, 4, 0)], 3), None);
        assert_eq!(adoptable(&[at(0, 4, 0), at(1, 4, 0)], 3), None);
        assert_eq!(adoptable(&[at(0, 4, 0), at(0, 4, 0), at(2, 4, 0)], 3), None);
        assert_eq!(adoptable(&[at(0, 4, 0), at(1, 4, 0), AdoptAnswer { total_steps: 9, ..at(2, 4, 0) }], 3), None);
        // Diffusion forcing: the ranks at the step reached agree on the chunks done.
        let chunks = |rank: u32, steps_done: u32, busy: u32, chunks_done: u32| AdoptAnswer { chunks_done, ..at(rank, steps_done, busy) };
        assert_eq!(adoptable(&[chunks(0, 5, 0, 1), chunks(1, 4, 1, 0), chunks(2, 5, 0, 1)], 3), Some(5));
        assert_eq!(adoptable(&[chunks(0, 5, 0, 1), chunks(1, 5, 0, 0), chunks(2, 5, 0, 1)], 3), None);
        assert_eq!(adoptable(&[at(0, 11, 0), at(1, 11, 0), at(2, 11, 0)], 3), None, "past the total");
    }

    /// Ranks at one step with a checkpoint or decode still running on some are asked again: it
    /// ends by itself. Ranks that disagree otherwise, or run a step, are not waited for.
    #[test]
    fn a_run_in_a_checkpoint_is_waited_for() {
        let at = |rank: u32, steps_done: u32, busy: u32| AdoptAnswer { rank, ranks: 3, steps_done, total_steps: 10, chunks_done: 0, busy };
        assert!(settles(&[at(0, 4, 2), at(1, 4, 0), at(2, 4, 0)], 3));
        assert!(settles(&[at(0, 4, 2), at(1, 4, 2), at(2, 4, 2)], 3));
        assert!(!settles(&[at(0, 4, 0), at(1, 4, 0), at(2, 4, 0)], 3), "adoptable already");
        assert!(!settles(&[at(0, 4, 2), at(1, 4, 1), at(2, 4, 0)], 3), "a step runs");
        assert!(!settles(&[at(0, 5, 2), at(1, 4, 0), at(2, 4, 0)], 3), "ranks at different steps");
        assert!(!settles(&[at(0, 4, 2), at(1, 4, 0)], 3), "a rank missing");
        assert!(!settles(&[at(0, 4, 2), at(0, 4, 0), at(2, 4, 0)], 3), "a rank twice");
        // Once the checkpoint is done, the same ranks are adopted.
        assert_eq!(adoptable(&[at(0, 4, 0), at(1, 4, 0), at(2, 4, 0)], 3), Some(4));
    }
}
