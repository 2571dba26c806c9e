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

/// How long taking a job over may take (connecting, and each rank's answer, which does not wait
/// for a step in flight). A rank that does not answer in time makes the job resume from its
/// checkpoint instead.
const ADOPT_LIMIT: Duration = Duration::from_secs(5);

/// How long taking a job over waits for a command other than a step (a checkpoint or a decode
/// the earlier coordinator sent every rank) to finish, asking the ranks again every
/// [`ADOPT_POLL`], before it resumes the job from its checkpoint instead (which costs up to
/// `--checkpoint-every` steps). A coordinator resumes its stored jobs one after another as it
/// starts, so the wait is short: a checkpoint's gather takes seconds.
const ADOPT_SETTLE: Duration = Duration::from_secs(10);
/// How often the ranks are asked again while a checkpoint or decode in flight finishes.
const ADOPT_POLL: Duration = Duration::from_millis(200);

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
/// flight finishes ([`settles`]) are asked again, for up to [`ADOPT_SETTLE`].
pub async fn adopt_on(
    holders: &[WorkerRecord],
    job: &ExecJob,
    plan: tessera_cluster::JobPlan,
    tls: Option<&InternalTls>,
) -> Option<(Vec<WorkerRecord>, Adopted)> {
    if holders.len() != plan.ranks as usize {
        tracing::info!(job = %job.id, holders = holders.len(), ranks = plan.ranks, "not every rank of the job is still held: it cannot be adopted");
        return None;
    }
    let interceptor = JobSecret::new(&job.secret).with_epoch(job.epoch);
    let connects = holders.iter().map(|w| connect(w, ADOPT_LIMIT, &interceptor, tls));
    let mut ranks: Vec<Rank> = futures_util::future::join_all(connects)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .inspect_err(|e| tracing::info!(job = %job.id, error = %e, "a rank of the job cannot be reached"))
        .ok()?;
    let until = Instant::now() + ADOPT_SETTLE;
    loop {
        let calls = ranks.iter_mut().map(|rank| async move {
            let call = rank.client.adopt_job(pb::AdoptJobRequest { job_id: job.id.clone() });
            match tokio::time::timeout(ADOPT_LIMIT, call).await {
                Ok(Ok(answer)) => Some((rank.record.clone(), answer.into_inner())),
                outcome => {
                    tracing::info!(worker = %rank.record.worker_id, job = %job.id, ?outcome, "a rank of the job does not answer AdoptJob");
                    None
                }
            }
        });
        let mut answers: Vec<(WorkerRecord, pb::AdoptJobResponse)> = futures_util::future::join_all(calls).await.into_iter().collect::<Option<_>>()?;
        answers.sort_by_key(|(_, a)| a.rank);
        let steps: Vec<AdoptAnswer> = answers.iter().map(|(_, a)| AdoptAnswer::from(a)).collect();
        if let Some(steps_done) = adoptable(&steps, plan.ranks) {
            let adopted = Adopted { steps_done, total_steps: answers[0].1.total_steps };
            return Some((answers.into_iter().map(|(w, _)| w).collect(), adopted));
        }
        if !settles(&steps, plan.ranks) || Instant::now() >= until {
            tracing::info!(job = %job.id, answers = ?answers.iter().map(|(_, a)| a).collect::<Vec<_>>(), "the ranks of the job disagree: it cannot be adopted");
            return None;
        }
        tracing::debug!(job = %job.id, "a rank of the job still runs a checkpoint or decode: asking again");
        tokio::time::sleep(ADOPT_POLL).await;
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
