//! The best layout for a group size: every split of the devices into CFG halves, Ulysses and ring
//! degrees the model allows, evaluated; the fastest that fits wins.

use super::cost::{evaluate, Evaluation, JobShape, Layout};
use super::gpu::GpuKind;
use super::model::ModelShape;

/// What the system that runs the plan can do; the search offers nothing else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Whether the devices may split into conditional and unconditional halves.
    pub cfg_parallel: bool,
}

impl Capabilities {
    /// What Tessera runs: sequence parallelism (ring, Ulysses, USP) and CFG-parallel (two halves,
    /// one guidance pass each; for diffusion forcing too). The VAE always decodes (and encodes)
    /// split by rows over every rank of the group, so every layout has `vae_ranks` = its devices.
    /// The admission and `tessera plan` both plan with it, so the CLI never plans a layout the
    /// cluster refuses.
    pub const TESSERA: Self = Self { cfg_parallel: true };

    /// The layout of `gpus` devices with Ulysses degree `ulysses` in each sequence-parallel group
    /// (the rest forming rings), split into CFG halves when `cfg_parallel`, the VAE decoded over
    /// every rank: the one place a layout is made from a group size.
    pub fn layout(self, gpus: u32, ulysses: u32, cfg_parallel: bool) -> Layout {
        let sp = gpus / if cfg_parallel { 2 } else { 1 };
        Layout { gpus, ulysses, ring: sp / ulysses.max(1), cfg_parallel, vae_ranks: gpus.max(1) }
    }
}

/// Every layout of `gpus` devices that `caps` allow and the model's heads admit, evaluated,
/// fastest first (feasible ones before the rest).
pub fn candidates(model: &ModelShape, job: &JobShape, gpu: &GpuKind, gpus: u32, efficiency: f64, caps: Capabilities) -> Vec<Evaluation> {
    let mut out = Vec::new();
    let guided = model.forwards_per_step(job.guidance) == 2;
    for cfg_parallel in [false, true] {
        if cfg_parallel && !(caps.cfg_parallel && guided && gpus >= 2 && gpus.is_multiple_of(2)) {
            continue;
        }
        let sp = gpus / if cfg_parallel { 2 } else { 1 };
        for ulysses in (1..=sp).filter(|u| sp.is_multiple_of(*u) && model.heads.is_multiple_of(u64::from(*u))) {
            out.push(evaluate(model, job, gpu, caps.layout(gpus, ulysses, cfg_parallel), efficiency));
        }
    }
    out.sort_by(|a, b| {
        (a.infeasible.is_some(), a.timing.total, a.traffic.total())
            .partial_cmp(&(b.infeasible.is_some(), b.timing.total, b.traffic.total()))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    out
}

/// Predicted totals within this share of the fastest count as a tie (the model's own error is
/// larger): of tied layouts, the one sending the least over the network is chosen (a ring that
/// the model hides behind compute is still the likeliest to miss), then the one with the most
/// memory to spare.
pub const TIE: f64 = 0.01;

/// The fastest feasible layout of `gpus` devices (of those within [`TIE`] of it, the one with the
/// least network traffic, then the lowest peak memory); when none fits, the fastest of the rest,
/// whose `infeasible` says why.
pub fn best(model: &ModelShape, job: &JobShape, gpu: &GpuKind, gpus: u32, efficiency: f64, caps: Capabilities) -> Evaluation {
    let all = candidates(model, job, gpu, gpus, efficiency, caps);
    let Some(fastest) = all.first() else {
        // no layout at all (zero devices): the one-device layout's evaluation says why
        let layout = Layout { gpus, ulysses: 1, ring: gpus.max(1), cfg_parallel: false, vae_ranks: 1 };
        return evaluate(model, job, gpu, layout, efficiency);
    };
    if fastest.infeasible.is_some() {
        return fastest.clone();
    }
    let bound = fastest.timing.total * (1.0 + TIE);
    let tied = all.iter().filter(|e| e.infeasible.is_none() && e.timing.total <= bound);
    let order = |a: &&Evaluation, b: &&Evaluation| {
        a.traffic.network.total_cmp(&b.traffic.network).then(a.memory.peak.cmp(&b.memory.peak)).then(a.timing.total.total_cmp(&b.timing.total))
    };
    tied.min_by(order).unwrap_or(fastest).clone()
}

#[cfg(test)]
mod tests {
    use super::super::gpu::gpu_kind;
    use super::super::model::preset;
    use super::*;

    #[test]
    fn the_best_layout_is_the_fastest_that_fits_and_respects_the_heads() {
        let m = preset("wan2.1-t2v-1.3b").unwrap();
        let job = JobShape::wan(81, 480, 832, 50);
        let g = gpu_kind("h100-80gb").unwrap();
        let all = candidates(&m, &job, &g, 8, 0.35, Capabilities::TESSERA);
        // 12 heads: Ulysses 1, 2, 4 for 8 ranks; 1, 2, 4 for the halves of 4
        assert_eq!(all.len(), 6);
        assert!(all.iter().all(|e| 12 % e.layout.ulysses == 0));
        let b = best(&m, &job, &g, 8, 0.35, Capabilities::TESSERA);
        assert!(b.infeasible.is_none());
        assert!(all.iter().all(|e| e.timing.total * (1.0 + TIE) >= b.timing.total), "within a tie of the fastest");
        // of the layouts tied with it, the best sends the least over the network, then spares the
        // most memory
        let tied = all.iter().filter(|e| e.infeasible.is_none() && e.timing.total <= all[0].timing.total * (1.0 + TIE));
        assert!(tied.clone().count() >= 1);
        assert!(tied.into_iter().all(|e| e.traffic.network > b.traffic.network || (e.traffic.network == b.traffic.network && e.memory.peak >= b.memory.peak)));
        // what Tessera runs offers CFG-parallel, and decodes over every rank of every layout
        let today = candidates(&m, &job, &g, 8, 0.35, Capabilities::TESSERA);
        assert!(today.iter().all(|e| e.layout.vae_ranks == 8) && today.iter().any(|e| e.layout.cfg_parallel));
    }

    #[test]
    fn a_job_too_large_for_the_group_says_why() {
        let m = preset("wan2.1-t2v-14b").unwrap();
        let job = JobShape::wan(961, 1088, 1920, 50);
        let why = best(&m, &job, &gpu_kind("h100-80gb").unwrap(), 1, 0.35, Capabilities::TESSERA);
        assert!(why.infeasible.unwrap().contains("GiB"));
    }
}
