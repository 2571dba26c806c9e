"""diffusers' WanTransformer3DModel in bf16 on a CUDA GPU: the upstream side of the GPU forward benchmark.

Builds the model at a preset of bench/pytorch_dit.py (random weights from torch.manual_seed(0)),
stores it as `from_pretrained(torch_dtype=torch.bfloat16)` does (bf16, except the modules of
`_keep_in_fp32_modules`, kept in float32), and times whole forward passes on bf16 inputs with the
shapes `tessera bench dit --device cuda` uses (one sample, timestep 500, random text states), so the
two can be read side by side on the same GPU. Attention runs through diffusers' default backend
(torch SDPA, flash/cuDNN kernels on Hopper).

Prints a clear SKIP line and exits 0 when PyTorch, a CUDA device or diffusers is missing: timing
bare SDPA and matmuls is not a substitute for the model.

Example (what bench/gpu_suite.sh runs):
  python3 bench/diffusers_dit_gpu.py --preset wan-1.3b-2l --latent 16,21,60,104 --text-len 512
"""
import argparse
import json
import os
import statistics
import sys
import time


def skip(why):
    print(f"SKIP diffusers GPU benchmark: {why}")
    return 0


def to_diffusers_bf16(model, torch):
    """bf16 parameters except `_keep_in_fp32_modules` (matched by name part, as diffusers does);
    buffers (the RoPE tables) stay float32."""
    keep = list(getattr(type(model), "_keep_in_fp32_modules", None) or [])
    for name, p in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(torch.bfloat16)
    return keep


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan-1.3b-2l")
    p.add_argument("--latent", default="16,21,60,104", help="C,F,H,W of the latent")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args()

    try:
        import torch
    except ImportError:
        return skip("PyTorch is not installed")
    if not torch.cuda.is_available():
        return skip("PyTorch sees no CUDA device")
    try:
        import diffusers
        from diffusers import WanTransformer3DModel
    except Exception as e:  # ImportError, or a diffusers too old to have the Wan model
        return skip(f"diffusers with WanTransformer3DModel is not importable ({e}); pip install diffusers")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pytorch_dit import PRESETS, dit_flops

    if args.preset not in PRESETS:
        print(f"--preset {args.preset}: expected one of {sorted(PRESETS)}")
        return 2
    cfg = PRESETS[args.preset]
    latent = tuple(int(x) for x in args.latent.split(","))
    if len(latent) != 4 or latent[0] != cfg["in_channels"]:
        print(f"--latent {args.latent}: expected C,F,H,W with C = {cfg['in_channels']}")
        return 2

    torch.manual_seed(0)
    model = WanTransformer3DModel(**cfg).eval()
    keep = to_diffusers_bf16(model, torch)
    model = model.cuda()
    dev = torch.device("cuda")
    x = torch.randn(1, *latent, device=dev, dtype=torch.bfloat16)
    t = torch.tensor([500], dtype=torch.int64, device=dev)
    ctx = torch.randn(1, args.text_len, cfg["text_dim"], device=dev, dtype=torch.bfloat16)

    def forward():
        out = model(x, t, ctx, return_dict=False)[0]
        torch.cuda.synchronize()
        return out

    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for _ in range(args.warmup):
            forward()
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            out = forward()
            times.append((time.perf_counter() - t0) * 1e3)
    med, mn = statistics.median(times), min(times)
    flops, tokens = dit_flops(cfg, latent, args.text_len)
    r = {
        "bench": "dit", "impl": "diffusers", "preset": args.preset, "latent": list(latent), "text_len": args.text_len,
        "device": torch.cuda.get_device_name(0), "dtype": "bf16", "fp32_modules": keep, "output_dtype": str(out.dtype),
        "warmup": args.warmup, "iters": args.iters, "median_ms": med, "min_ms": mn, "tokens": tokens,
        "tokens_per_s": tokens / (med / 1e3), "gflop": flops / 1e9, "gflops": flops / (med / 1e3) / 1e9,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"diffusers dit forward  preset {args.preset}  on {r['device']} (bf16, fp32: {','.join(keep)})  "
          f"latent {list(latent)}  tokens {tokens}  text {args.text_len}  torch {r['torch']}  diffusers {r['diffusers']}")
    print(f"  median {med:.1f} ms  min {mn:.1f} ms  {r['tokens_per_s']:.0f} tokens/s  {r['gflops']:.1f} GFLOP/s "
          f"({r['gflop']:.1f} GFLOP)  peak GPU memory {r['peak_gpu_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
