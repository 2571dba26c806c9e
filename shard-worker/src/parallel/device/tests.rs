//! The device-side strategies under the host emulation of the CUDA model, over in-process ranks:
//! every plan against the one-device forward, and the bytes each rank moves.

use super::{DeviceShard, HostDeviceComm};
use crate::golden::{Comparison, Tolerance};
use crate::model::cuda::{EmulatedWanTransformer, HostOps};
use crate::parallel::{run_in_process, CommCounts, ParallelPlan, ShardContext};
use crate::{DitInputs, TransformerPreset};
use tessera_kernels::random::fill_normal;
use tessera_kernels::Tensor;

fn random(shape: &[usize], stream: u64) -> Tensor {
    let mut d = vec![0.0; shape.iter().product()];
    fill_normal(5, stream, 0, &mut d);
    Tensor::new(shape.to_vec(), d).unwrap()
}

/// The emulated device forward of rank `ctx` with host collectives over `ctx`'s groups.
fn device_forward(ctx: &ShardContext, model: &EmulatedWanTransformer, x: &DitInputs<'_>) -> (Tensor, CommCounts) {
    let (world, ulysses, ring) =
        (HostDeviceComm::new(ctx.world()), HostDeviceComm::new(ctx.attention().ulysses()), HostDeviceComm::new(ctx.attention().ring()));
    let shard = DeviceShard { world: &world, ulysses: &ulysses, ring: &ring, plan: ctx.plan() };
    let before = ctx.world().stats();
    let out = shard.forward(model, x).unwrap();
    (out, ctx.world().stats() - before)
}

/// The bound on a ring's rel-L2 distance from one device (see below).
const RING: Tolerance = Tolerance { rel_l2: 4e-3, max_abs: None, max_abs_over_max_ref: None };

/// Ulysses alone attends every head over the whole sequence with the same kernel as one device:
/// identical bits. A ring splits the keys: its blocks' partial results are merged in f32 and
/// rounded to bf16 once, where one device rounds its one softmax; the outputs then differ by
/// bf16 roundings (≈ 2⁻⁹ relative) carried through the layers, bounded here by 4e-3 rel-L2 —
/// a fifth of the 2e-2 bound the bf16 model is held to against the f32 reference. (On this
/// preset no rounding flips: 0 is observed. Skipping the merge gives 7.4e-2, so the check bites.)
#[test]
fn every_plan_gives_the_one_device_forward() {
    let model = EmulatedWanTransformer::preset(HostOps, TransformerPreset::Tiny, 11).unwrap();
    let cfg = model.config().clone();
    // 24 tokens (2·3·4) split evenly; 15 tokens (1·3·5) split unevenly.
    for (f, h, w) in [(2, 6, 8), (1, 6, 10)] {
        let hidden = random(&[2, cfg.in_channels, f, h, w], 1);
        let text = random(&[2, 5, cfg.text_dim], 2);
        let x = DitInputs { hidden_states: &hidden, timesteps: &[700.0, 30.0], encoder_hidden_states: &text, encoder_hidden_states_image: None };
        let want = model.forward(&x).unwrap();
        for (ranks, ulysses) in [(2, 2), (2, 1), (3, 1), (4, 2), (4, 1)] {
            let plan = ParallelPlan::new(ranks, ulysses, cfg.num_attention_heads).unwrap();
            let outs = run_in_process(plan, |ctx| Ok(device_forward(ctx, &model, &x).0)).unwrap();
            for (rank, got) in outs.iter().enumerate() {
                assert_eq!(got.shape(), want.shape());
                let c = Comparison::new(got.data(), want.data(), &RING);
                eprintln!("{} tokens, P={ranks} U={ulysses}, rank {rank}: rel-L2 {:.2e}", f * h * w / 4, c.rel_l2);
                if plan.ring == 1 {
                    assert_eq!(got.data(), want.data(), "Ulysses only must be bit-identical (P={ranks})");
                } else {
                    assert!(c.passed, "P={ranks} U={ulysses} rank {rank}: {c:?}");
                }
            }
            assert!(outs.windows(2).all(|p| p[0] == p[1]), "every rank holds the same velocity");
        }
    }
}

/// Bytes each rank sends per forward (bf16 activations, f32 output rows), against
/// `reference/parallelism.md`: the ring moves the K and V blocks of the other R−1 ring members,
/// Ulysses moves q, k, v and the output through all-to-alls, and the head's rows are all-gathered.
#[test]
fn bytes_moved_match_the_formulas() {
    let model = EmulatedWanTransformer::preset(HostOps, TransformerPreset::Tiny, 3).unwrap();
    let cfg = model.config().clone();
    let hidden = random(&[1, cfg.in_channels, 2, 6, 8], 3);
    let text = random(&[1, 5, cfg.text_dim], 4);
    let x = DitInputs { hidden_states: &hidden, timesteps: &[500.0], encoder_hidden_states: &text, encoder_hidden_states_image: None };
    let (n, hd, layers) = (24u64, cfg.inner_dim() as u64, cfg.num_layers as u64);
    let (bf16, f32b) = (2u64, 4u64);
    for (ranks, ulysses) in [(2usize, 1usize), (4, 1), (2, 2), (4, 2)] {
        let plan = ParallelPlan::new(ranks, ulysses, cfg.num_attention_heads).unwrap();
        let counts = run_in_process(plan, |ctx| Ok(device_forward(ctx, &model, &x).1)).unwrap();
        let (p, u, r) = (ranks as u64, ulysses as u64, plan.ring as u64);
        for c in counts {
            assert_eq!(c.ring, layers * 2 * (r - 1) * (n / r) * (hd / u) * bf16, "P={p} U={u}");
            assert_eq!(c.all_to_all, layers * 4 * (n / p) * hd * (u - 1) / u * bf16, "P={p} U={u}");
            assert_eq!(c.all_gather, (p - 1) * (n / p) * cfg.patch_out() as u64 * f32b, "P={p}");
            assert_eq!(c.received, c.sent(), "P={p} U={u}: even shards receive what they send");
        }
    }
}
