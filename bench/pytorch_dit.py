"""PyTorch CPU reference benchmark for Tessera's Wan 2.1 DiT forward.

Builds diffusers' WanTransformer3DModel (float32, CPU, random weights from
torch.manual_seed(0)) at a chosen preset and times full forward passes, so the
Rust CPU forward can be compared with PyTorch on the same machine and thread
count. A second mode (--attention-only) times just
torch.nn.functional.scaled_dot_product_attention on [1, H, N, d] float32.

Examples:
  python3 bench/pytorch_dit.py --preset wan-1.3b-2l --threads 2
  python3 bench/pytorch_dit.py --attention-only --tokens 32760 --heads 1 --head-dim 128
  python3 bench/pytorch_dit.py --preset tiny --latent 4,3,8,8 --text-len 16 --json
"""
import argparse
import json
import math
import resource
import statistics
import time

import torch

PRESETS = {
    # Wan 2.1-1.3B width (hidden 1536), truncated to 2 blocks.
    "wan-1.3b-2l": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                        eps=1e-6, rope_max_seq_len=1024),
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                 in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                 eps=1e-6, rope_max_seq_len=1024),
}


def dit_flops(cfg, latent, text_len):
    """Analytic FLOP count (1 multiply-add = 2 FLOPs) of one Wan DiT forward.

    S = video tokens, L = text tokens, D = hidden, F = ffn_dim. Per block:
      self-attn q,k,v,o projections  2*S*D*D*4
      self-attn scores + values      4*S*S*D
      cross-attn q,o projections     2*S*D*D*2
      cross-attn k,v projections     2*L*D*D*2
      cross-attn scores + values     4*S*L*D
      FFN (up + down)                2*S*D*F*2
    Once per forward:
      text embedder (Linear text_dim->D, Linear D->D)  2*L*text_dim*D + 2*L*D*D
      time embedder (freq->D, D->D) + time_proj (D->6D) 2*freq*D + 2*D*D + 2*D*6D
      patch embed (Conv3d as matmul)  2*S*(C*pt*ph*pw)*D
      head proj_out                   2*S*D*(out*pt*ph*pw)
    Norms, modulation, RoPE, GELU and softmax are elementwise and left out.
    """
    c, f, h, w = latent
    pt, ph, pw = cfg["patch_size"]
    S = (f // pt) * (h // ph) * (w // pw)
    L, D, F = text_len, cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]
    P = pt * ph * pw
    block = (2 * S * D * D * 4 + 4 * S * S * D
             + 2 * S * D * D * 2 + 2 * L * D * D * 2 + 4 * S * L * D
             + 2 * S * D * F * 2)
    once = (2 * L * cfg["text_dim"] * D + 2 * L * D * D
            + 2 * cfg["freq_dim"] * D + 2 * D * D + 2 * D * 6 * D
            + 2 * S * c * P * D + 2 * S * D * cfg["out_channels"] * P)
    return cfg["num_layers"] * block + once, S


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


def time_fn(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def bench_dit(args):
    from diffusers import WanTransformer3DModel

    cfg = PRESETS[args.preset]
    latent = tuple(int(x) for x in args.latent.split(","))
    assert len(latent) == 4 and latent[0] == cfg["in_channels"], "latent C must equal in_channels"
    torch.manual_seed(0)
    base_rss = peak_rss_mib()  # after importing torch + diffusers
    model = WanTransformer3DModel(**cfg).eval()  # parameters are float32 by default
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(1, *latent)
    t = torch.tensor([500], dtype=torch.int64)
    ctx = torch.randn(1, args.text_len, cfg["text_dim"])
    with torch.no_grad():
        med, mn = time_fn(lambda: model(x, t, ctx, return_dict=False), args.warmup, args.iters)
    flops, S = dit_flops(cfg, latent, args.text_len)
    return {
        "mode": "dit", "preset": args.preset, "latent": list(latent), "text_len": args.text_len,
        "threads": torch.get_num_threads(), "warmup": args.warmup, "iters": args.iters,
        "params": sum(p.numel() for p in model.parameters()),
        "median_ms": med, "min_ms": mn, "tokens": S, "tokens_per_s": S / (med / 1e3),
        "gflop": flops / 1e9, "gflops_per_s": flops / (med / 1e3) / 1e9,
        "peak_rss_mib": peak_rss_mib(), "import_rss_mib": base_rss, "torch": torch.__version__,
    }


def bench_attention(args):
    torch.manual_seed(0)
    base_rss = peak_rss_mib()  # after importing torch
    shape = (1, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        med, mn = time_fn(lambda: sdpa(q, k, v), args.warmup, args.iters)
    flops = 4 * args.tokens * args.tokens * args.head_dim * args.heads  # QK^T + PV
    return {
        "mode": "attention", "tokens": args.tokens, "heads": args.heads, "head_dim": args.head_dim,
        "threads": torch.get_num_threads(), "warmup": args.warmup, "iters": args.iters,
        "median_ms": med, "min_ms": mn, "gflop": flops / 1e9,
        "gflops_per_s": flops / (med / 1e3) / 1e9,
        "peak_rss_mib": peak_rss_mib(), "import_rss_mib": base_rss, "torch": torch.__version__,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="wan-1.3b-2l")
    p.add_argument("--latent", default="16,5,30,52", help="C,F,H,W of the latent")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--attention-only", action="store_true")
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    r = bench_attention(args) if args.attention_only else bench_dit(args)
    if args.json:
        print(json.dumps(r))
        return
    if r["mode"] == "dit":
        print(f"preset {r['preset']}  latent {r['latent']}  text_len {r['text_len']}  "
              f"params {r['params'] / 1e6:.1f}M  threads {r['threads']}  torch {r['torch']}")
        print(f"forward: median {r['median_ms']:.1f} ms  min {r['min_ms']:.1f} ms  "
              f"tokens {r['tokens']}  {r['tokens_per_s']:.1f} tokens/s")
    else:
        print(f"sdpa [1,{r['heads']},{r['tokens']},{r['head_dim']}] f32  threads {r['threads']}  "
              f"torch {r['torch']}")
        print(f"attention: median {r['median_ms']:.1f} ms  min {r['min_ms']:.1f} ms")
    print(f"{r['gflop']:.4g} GFLOP  {r['gflops_per_s']:.1f} GFLOP/s  "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB (after imports {r['import_rss_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
