#!/usr/bin/env bash
# Tessera's CPU forward against diffusers (PyTorch, float32) on the same machine, same threads,
# same shapes: runs them alternately ROUNDS times (these machines are noisy) and prints each
# side's median of medians and the ratio. Needs `pip install torch diffusers`.
#
#   bench/compare_cpu.sh [ROUNDS] [THREADS]        # default 3 rounds, 2 threads
#   BENCH=attention bench/compare_cpu.sh           # attention alone, 32,760 tokens, one head of 128
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
threads=${2:-2}
bench=${BENCH:-dit}
cargo build --release -q --bin tessera
out=$(mktemp)
for i in $(seq "$rounds"); do
  if [ "$bench" = dit ]; then
    ./target/release/tessera bench dit --preset wan-1.3b-2l --latent 16,5,30,52 --text-len 512 --threads "$threads" --warmup 1 --iters 3 --json | sed 's/^/rust /' >>"$out"
    python3 bench/pytorch_dit.py --preset wan-1.3b-2l --latent 16,5,30,52 --text-len 512 --threads "$threads" --warmup 1 --iters 3 --json | sed 's/^/torch /' >>"$out"
  else
    ./target/release/tessera bench attention --tokens 32760 --heads 1 --head-dim 128 --threads "$threads" --warmup 0 --iters 1 --json | sed 's/^/rust /' >>"$out"
    python3 bench/pytorch_dit.py --attention-only --tokens 32760 --heads 1 --head-dim 128 --threads "$threads" --warmup 0 --iters 1 --json | sed 's/^/torch /' >>"$out"
  fi
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = {"rust": [], "torch": []}
for line in open(sys.argv[1]):
    side, js = line.split(" ", 1)
    runs[side].append(json.loads(js))
med = {s: statistics.median(r["median_ms"] for r in v) for s, v in runs.items()}
for s, v in runs.items():
    print(f"{s:5}  medians {[round(r['median_ms'], 1) for r in v]} ms -> {med[s]:.1f} ms; peak RSS {max(r.get('peak_rss_mib', 0) for r in v):.0f} MiB")
print(f"speed ratio (torch time / rust time): {med['torch'] / med['rust']:.2f}x")
PY
rm -f "$out"
