"""PyTorch SDPA on the GPU: the side-by-side reference for Tessera's flash attention kernel.

Times torch.nn.functional.scaled_dot_product_attention on bf16 [1, H, N, d] (non-causal, no
mask, default scale) with CUDA events, for each SDPA backend this PyTorch offers (flash,
cuDNN, memory-efficient) and for PyTorch's own choice, and prints the same FLOP count as
`tessera-gpu-bench` (4·H·N²·d per call).

  python3 bench/sdpa_attention.py                       # 32,760 tokens, 12 heads of 128
  python3 bench/sdpa_attention.py --heads 24 --head-dim 64
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, iters):
    fn()
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}")
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (1, a.heads, a.tokens, a.head_dim)
    q = torch.rand(shape, device=dev, dtype=torch.bfloat16, generator=g) * 4 - 2
    k = torch.rand(shape, device=dev, dtype=torch.bfloat16, generator=g) * 4 - 2
    v = torch.rand(shape, device=dev, dtype=torch.bfloat16, generator=g) * 2 - 1
    flops = 4.0 * a.heads * a.tokens * a.tokens * a.head_dim
    backends = [("flash", [SDPBackend.FLASH_ATTENTION]), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                ("efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("default", None)]
    for name, which in backends:
        def run():
            return F.scaled_dot_product_attention(q, k, v)
        try:
            if which is None:
                ms = time_ms(run, a.iters)
            else:
                with sdpa_kernel(which):
                    ms = time_ms(run, a.iters)
        except RuntimeError as e:
            print(f"sdpa[{name}] d={a.head_dim} heads={a.heads} tokens={a.tokens}: unavailable ({str(e).splitlines()[0]})")
            continue
        print(f"sdpa[{name}] d={a.head_dim} heads={a.heads} tokens={a.tokens}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s")


if __name__ == "__main__":
    main()
