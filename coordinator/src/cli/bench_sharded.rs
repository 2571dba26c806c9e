//! `tessera bench dit --ranks P`: the sequence-parallel forward on P ranks of this process
//! (threads, connected in-process or by real TCP on loopback) against the one-rank forward in
//! the same run, with the bytes each rank moves and how much of the communication was hidden
//! behind compute.

use super::bench_timing::Timing;
use anyhow::{bail, Result};
use std::time::Instant;
use tessera_worker::model::DitModel;
use tessera_worker::parallel::{run_local_group, shard_ranges, CommCounts, LocalTransport, ParallelPlan, ShardContext};
use tessera_worker::DitInputs;

/// What one sharded run measured.
pub struct ShardedFigures {
    /// Median forward time over the group (the slowest rank of each run), ms.
    pub median_ms: f64,
    /// Bytes sent per rank per forward (rank 0).
    pub per_rank: CommCounts,
    /// Seconds per forward a rank spent blocked on ring blocks and all-to-alls.
    pub exposed_comm_s: f64,
    /// Seconds per forward the same transfers take with nothing to hide behind.
    pub standalone_comm_s: f64,
    /// Seconds per forward in attention compute.
    pub attention_s: f64,
}

/// Runs the forward on `plan` over `transport`, timed like the one-rank benchmark, then times the
/// same ring and all-to-all transfers alone to tell how much communication the overlap hid.
pub fn measure(model: &DitModel, inputs: &DitInputs<'_>, plan: ParallelPlan, transport: LocalTransport, timing: &Timing) -> Result<ShardedFigures> {
    let cfg = model.config();
    let (_, grid) = model.check_inputs(inputs)?;
    let runs = timing.warmup + timing.iters;
    if timing.iters == 0 {
        bail!("--iters must be at least 1");
    }
    // Per rank: per-run wall times, and the counters of the timed runs.
    let results = run_local_group(transport, plan, |ctx: &ShardContext| {
        let mut times = Vec::with_capacity(runs);
        let mut before = None;
        for i in 0..runs {
            if i == timing.warmup {
                before = Some((ctx.world().stats(), ctx.timings().seconds()));
            }
            ctx.world().barrier()?;
            let t = Instant::now();
            ctx.forward(model, inputs)?;
            times.push(t.elapsed().as_secs_f64());
        }
        let (c0, (a0, w0, x0)) = before.unwrap_or_default();
        let (a1, w1, x1) = ctx.timings().seconds();
        let counts = ctx.world().stats() - c0;
        // The same transfers with no compute: every layer's ring hops and all-to-alls.
        let standalone = standalone_comm(ctx, cfg.num_layers, grid.tokens(), cfg.inner_dim())?;
        Ok((times, counts, (w1 - w0) + (x1 - x0), a1 - a0, standalone))
    })?;
    let iters = timing.iters as f64;
    let mut walls: Vec<f64> = (timing.warmup..runs).map(|i| results.iter().map(|r| r.0[i]).fold(0.0, f64::max) * 1e3).collect();
    walls.sort_by(f64::total_cmp);
    let (_, counts, _, attention, standalone) = &results[0];
    let per = |x: u64| (x as f64 / iters).round() as u64;
    Ok(ShardedFigures {
        median_ms: walls[walls.len() / 2],
        per_rank: CommCounts {
            all_gather: per(counts.all_gather),
            gather: per(counts.gather),
            cfg: per(counts.cfg),
            all_to_all: per(counts.all_to_all),
            ring: per(counts.ring),
            broadcast: per(counts.broadcast),
            halo: per(counts.halo),
            received: per(counts.received),
        },
        exposed_comm_s: results.iter().map(|r| r.2).sum::<f64>() / results.len() as f64 / iters,
        standalone_comm_s: *standalone,
        attention_s: attention / iters,
    })
}

/// Seconds one forward's attention communication takes on this rank when nothing overlaps it:
/// per layer, the all-to-alls of q/k/v and of the output, then the ring hops, each waited for at
/// once.
fn standalone_comm(ctx: &ShardContext, layers: usize, tokens: usize, hidden: usize) -> tessera_worker::Result<f64> {
    let plan = ctx.plan();
    let ring = ctx.ring();
    let ulysses = ctx.ulysses();
    let rows = shard_ranges(tokens, plan.ranks())[ctx.rank()].len();
    let heads_w = hidden / plan.ulysses;
    let ring_rows: usize =
        shard_ranges(tokens, plan.ranks()).iter().enumerate().filter(|(r, _)| plan.ulysses_group(ctx.rank()).contains(r)).map(|(_, r)| r.len()).sum();
    ctx.world().barrier()?;
    let t = Instant::now();
    for _ in 0..layers {
        if plan.ulysses > 1 {
            ulysses.all_to_all((0..plan.ulysses).map(|_| vec![0.0; 3 * rows * heads_w]).collect())?;
        }
        let block = vec![0.0f32; 2 * ring_rows * heads_w];
        let mut kv = block;
        for _ in 1..plan.ring {
            kv = ring.ring_shift(&kv)?.wait()?;
        }
        if plan.ulysses > 1 {
            ulysses.all_to_all((0..plan.ulysses).map(|_| vec![0.0; rows * heads_w]).collect())?;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Prints the sharded figures beside the one-rank median of the same run.
pub fn report(figures: &ShardedFigures, plan: ParallelPlan, transport: LocalTransport, one_rank_ms: f64, tokens: usize, json: bool) {
    let hidden_share = if figures.standalone_comm_s > 0.0 { (1.0 - figures.exposed_comm_s / figures.standalone_comm_s).clamp(0.0, 1.0) } else { 1.0 };
    let c = &figures.per_rank;
    let transport = match transport {
        LocalTransport::InProcess => "inproc",
        LocalTransport::TcpLoopback => "tcp",
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"bench": "dit-sharded", "ranks": plan.ranks(), "ulysses": plan.ulysses, "ring": plan.ring, "transport": transport, "tokens": tokens,
                "median_ms": figures.median_ms, "one_rank_ms": one_rank_ms, "speedup": one_rank_ms / figures.median_ms,
                "bytes_per_rank": {"ring": c.ring, "all_to_all": c.all_to_all, "all_gather": c.all_gather},
                "attention_s": figures.attention_s, "exposed_comm_s": figures.exposed_comm_s, "standalone_comm_s": figures.standalone_comm_s, "comm_hidden_share": hidden_share})
        );
    } else {
        println!(
            "  sharded over {} ranks (ulysses {} x ring {}, {transport}): median {:.1} ms against {:.1} ms on one rank ({:.2}x)",
            plan.ranks(),
            plan.ulysses,
            plan.ring,
            figures.median_ms,
            one_rank_ms,
            one_rank_ms / figures.median_ms
        );
        println!(
            "  per rank per forward: ring {:.2} MiB, all-to-all {:.2} MiB, output gather {:.2} MiB; attention {:.1} ms; communication {:.1} ms alone, {:.1} ms exposed ({:.0}% hidden)",
            c.ring as f64 / 1048576.0,
            c.all_to_all as f64 / 1048576.0,
            c.all_gather as f64 / 1048576.0,
            figures.attention_s * 1e3,
            figures.standalone_comm_s * 1e3,
            figures.exposed_comm_s * 1e3,
            hidden_share * 100.0
        );
    }
}
