#!/usr/bin/env bash
# The GPU suite of the CUDA backend, in one script: every CUDA kernel against its CPU twin
# (kernels/tests/gpu_kernels.rs, TESSERA_REQUIRE_GPU=1 so nothing skips), the NVRTC/ptxas compile
# check with the GPU machine's own CUDA, a compute-sanitizer memcheck of the kernel tests, the
# kernel benchmark (tessera-gpu-bench: attention TFLOP/s at 32,760 tokens, GEMMs, norms) and
# PyTorch SDPA on the same GPU (bench/sdpa_attention.py); then the whole bf16 transformer
# (shard-worker/tests/gpu_transformer.rs: golden cases, CUDA vs CPU and vs the host emulation) and
# its forward benchmark at Wan 2.1-1.3B width, `tessera bench dit --device cuda` beside diffusers'
# WanTransformer3DModel in bf16 (bench/diffusers_dit_gpu.py). On a machine with two GPUs or more,
# sequence parallelism over NCCL (shard-worker/tests/gpu_sequence_parallel.rs: the collectives,
# every ring/Ulysses/USP plan against one GPU); with one GPU that step says it skipped.
# Prints everything, then a summary.
#
# The GPU machine has the CUDA 13 driver, nvcc, PyTorch, no Rust and no network, so the binaries
# are built here and carried there:
#
#   bench/gpu_suite.sh build        # here: release test + bench binaries -> .gpu-bin/ (git-ignored)
#   bench/gpu_suite.sh run          # there, from the repository root, with .gpu-bin/ beside it
#
# With this workplace's device tool: build here, then
#   run(command="bash bench/gpu_suite.sh run", carry=[".gpu-bin"], timeout_s=600)
# Options for `run` (environment): BUDGET_S=s the suite's whole time (default 540; each step has
# its own limit too, and steps that no longer fit are skipped and listed), STEPS=regex the step
# ids to run (kernels, nvrtc, transformer, golden, kbench, sdpa128, sdpa64, ditbench, diffusersdit,
# goldenwgmma, ditwgmma, ditoverlap, goldenusp, goldensplit, textbench, vaebench, vaeref, generate, nccl,
# memcheck, racecheck), ITERS=n timed iterations, TOKENS=n the kernel benchmark's sequence
# length, DIT_LATENT=C,F,H,W the transformer benchmark's latent (default 16,21,60,104: 32,760
# tokens). Output goes to $OUT/suite.log and $OUT/summary.txt as well (OUT defaults to
# /tmp/gpu-suite-out); it ends with the figures (attention TFLOP/s, DiT medians) and the summary.
# Exit status: non-zero if any step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.gpu-bin

build() {
  set -e
  rm -rf "$BIN" && mkdir -p "$BIN"
  # Test binaries: cargo prints their paths in its JSON messages.
  cargo test -p tessera-kernels --release --no-run --tests --message-format=json 2>/dev/null \
    | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe and m["target"]["name"] in ("gpu_kernels", "nvrtc_compile"):
        shutil.copy(exe, sys.argv[1] + "/" + m["target"]["name"]); print("test binary", m["target"]["name"], "<-", exe)
' "$BIN"
  cargo test -p tessera-worker --release --no-run --test gpu_transformer --test gpu_sequence_parallel --message-format=json 2>/dev/null \
    | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe and m["target"]["name"] in ("gpu_transformer", "gpu_sequence_parallel"):
        shutil.copy(exe, sys.argv[1] + "/" + m["target"]["name"]); print("test binary", m["target"]["name"], "<-", exe)
' "$BIN"
  cargo build -p tessera-kernels --release --bin tessera-gpu-bench
  cargo build -p tessera-coordinator --release --bin tessera
  cp target/release/tessera-gpu-bench target/release/tessera "$BIN/"
  strip "$BIN"/* 2>/dev/null || true
  # Compressed (xz), or the binaries and the tree are over what the device tool carries; `run`
  # unpacks them with Python's lzma, which every python3 has.
  xz -T0 -6 "$BIN"/gpu_kernels "$BIN"/nvrtc_compile "$BIN"/gpu_transformer "$BIN"/gpu_sequence_parallel "$BIN"/tessera-gpu-bench "$BIN"/tessera
  # diffusers as a wheel: the GPU machine's image has PyTorch, transformers and every package
  # diffusers needs, but not diffusers itself, and no network; `run` installs it offline.
  python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps -d "$BIN/wheels" diffusers \
    || echo "warning: could not download the diffusers wheel (the diffusers steps will say SKIP)"
  du -sh "$BIN"
  # The device tool carries the working tree and $BIN together, 64 MiB in all.
  local tree
  tree=$(git ls-files -z | xargs -0 du -cm | tail -1 | cut -f1)
  [ $(( $(du -sm "$BIN" | cut -f1) + tree )) -le 62 ] || { echo "$BIN + the working tree ($tree MiB) are over the 64 MiB the device tool carries"; exit 1; }
  ls -la "$BIN"
  echo "now run on the GPU machine: bash bench/gpu_suite.sh run (carry $BIN)"
}

# Finds the CUDA user-space libraries cudarc loads (NVRTC, cuBLASLt, NCCL) among the CUDA toolkit
# and the pip wheels of PyTorch's environment, and links them under the names cudarc looks for.
setup_libs() {
  LIBDIR=$(mktemp -d /tmp/tessera-cuda-libs.XXXX)
  python3 - "$LIBDIR" <<'PY'
import glob, os, site, sys
out = sys.argv[1]
roots = [os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/lib64", "/usr/local/cuda/lib64",
         "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu"]
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    roots += glob.glob(sp + "/nvidia/*/lib") + glob.glob(sp + "/nvidia/cu*/lib")
dirs = []
for name in ("nvrtc", "cublasLt", "nccl"):
    found = None
    for r in roots:
        hits = sorted(h for h in glob.glob(f"{r}/lib{name}.so*") if "builtins" not in h and ".alt." not in h)
        if hits:
            found = hits[-1]
            break
    if found:
        os.symlink(found, f"{out}/lib{name}.so")
        dirs.append(os.path.dirname(found))
        print(f"lib{name}: {found}")
    else:
        print(f"lib{name}: not found")
open(out + "/dirs", "w").write(":".join(dict.fromkeys(dirs)))
PY
  export LD_LIBRARY_PATH="$LIBDIR:$(cat "$LIBDIR/dirs"):/usr/local/nvidia/lib64:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PATH="/usr/local/cuda/bin:$PATH"
  [ -d /usr/local/cuda/include ] && export TESSERA_CUDA_INCLUDE=/usr/local/cuda/include
}

declare -a SUMMARY=()
# step ID LIMIT_S NAME COMMAND...: runs COMMAND under a time limit (the smaller of LIMIT_S and what
# is left of the suite's budget), records PASS / FAIL / TIMEOUT / SKIP. STEPS (a regex over the
# ids) picks which steps run; a step that no longer fits in the budget is skipped and says so.
step() {
  local id=$1 limit=$2 name=$3; shift 3
  if ! [[ $id =~ ${STEPS:-.} ]]; then return; fi
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt 20 ]; then SUMMARY+=("SKIP  [$id] $name (budget spent)"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo; echo "===== [$id] $name (limit ${limit} s): $*"
  local t0=$SECONDS rc
  timeout -k 5 "$limit" "$@"; rc=$?
  local took=$((SECONDS - t0))
  case $rc in
    0) SUMMARY+=("PASS  [$id] $name ($took s)") ;;
    124 | 137) SUMMARY+=("TIMEOUT [$id] $name ($took s, limit $limit s)") ;;
    *) SUMMARY+=("FAIL  [$id] $name ($took s, rc $rc)") ;;
  esac
  printf '%s\n' "${SUMMARY[-1]}" >> "$OUTDIR/summary.txt"
}

run() {
  for x in "$BIN"/*.xz; do
    [ -e "$x" ] || continue
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$x" "${x%.xz}" && chmod +x "${x%.xz}" && rm -f "$x"
  done
  for b in gpu_kernels nvrtc_compile tessera-gpu-bench gpu_transformer gpu_sequence_parallel tessera; do
    [ -x "$BIN/$b" ] || { echo "missing $BIN/$b: run 'bench/gpu_suite.sh build' on the build machine and carry $BIN"; exit 2; }
  done
  # Everything printed goes to $OUT/suite.log too (the device tool brings $OUT back), the summary
  # to $OUT/summary.txt as each step ends, so a run cut short still reports what it did.
  OUTDIR=${OUT:-/tmp/gpu-suite-out}
  mkdir -p "$OUTDIR" && : > "$OUTDIR/summary.txt"
  exec > >(tee -a "$OUTDIR/suite.log") 2>&1
  DEADLINE=$((SECONDS + ${BUDGET_S:-540}))
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  setup_libs
  if ! python3 -c "import diffusers" 2>/dev/null && ls "$BIN"/wheels/diffusers-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tessera-site "$BIN"/wheels/*.whl \
      && export PYTHONPATH=/tmp/tessera-site${PYTHONPATH:+:$PYTHONPATH} || echo "warning: diffusers could not be installed offline"
  fi
  export TESSERA_REQUIRE_GPU=1 RUST_BACKTRACE=1
  local it=${ITERS:-10} tok=${TOKENS:-32760} lat=${DIT_LATENT:-16,21,60,104}
  # Correctness first (each kernel, then the models, then every golden kind), then the figures,
  # then the sanitizers, which are the slowest.
  step kernels 150 "kernels vs CPU twins" "$BIN/gpu_kernels" --test-threads=1 --nocapture
  step nvrtc 90 "NVRTC + ptxas compile check (this machine's CUDA)" "$BIN/nvrtc_compile" --nocapture
  step transformer 150 "bf16 transformer: golden cases, CUDA vs CPU and vs host emulation" "$BIN/gpu_transformer" --test-threads=1 --nocapture
  # Every golden kind with its models on the GPU (dit, umt5, clip, vae and pipeline in bf16; the
  # scheduler's arithmetic on the host), at the bf16 tolerances the CLI prints.
  step golden 180 "tessera golden --backend cuda, every kind" "$BIN/tessera" golden --backend cuda tests/golden
  step kbench 90 "tessera-gpu-bench" "$BIN/tessera-gpu-bench" --tokens "$tok" --iters "$it"
  step sdpa128 60 "PyTorch SDPA, 12 heads of 128" python3 bench/sdpa_attention.py --tokens "$tok" --heads 12 --head-dim 128 --iters "$it"
  step sdpa64 60 "PyTorch SDPA, 24 heads of 64" python3 bench/sdpa_attention.py --tokens "$tok" --heads 24 --head-dim 64 --iters "$it"
  step ditbench 120 "tessera bench dit --device cuda, Wan 2.1-1.3B width (2 blocks)" "$BIN/tessera" bench dit --device cuda \
    --preset wan-1.3b-2l --latent "$lat" --text-len 512 --warmup 2 --iters "$it"
  step diffusersdit 120 "diffusers WanTransformer3DModel bf16, same config and shapes" python3 bench/diffusers_dit_gpu.py \
    --preset wan-1.3b-2l --latent "$lat" --text-len 512 --warmup 2 --iters "$it"
  # The warpgroup-MMA attention (sm_90a; kernels/cuda/flash_attention_sm90.cu), both schedules
  # (wgmma: one after the other; wgmma-overlap: the softmax beside the previous tile's P·V), in the
  # whole model: the golden transformer cases, then the forward benchmark beside the two above.
  # The kernel tests (step kernels) and tessera-gpu-bench (step kbench) run both against the CPU
  # twin first.
  step goldenwgmma 90 "tessera golden --backend cuda --kind dit, TESSERA_CUDA_ATTENTION=wgmma and wgmma-overlap" bash -c \
    "TESSERA_CUDA_ATTENTION=wgmma '$BIN/tessera' golden --backend cuda --kind dit tests/golden \
     && TESSERA_CUDA_ATTENTION=wgmma-overlap '$BIN/tessera' golden --backend cuda --kind dit tests/golden"
  step ditwgmma 120 "tessera bench dit --device cuda, TESSERA_CUDA_ATTENTION=wgmma" env TESSERA_CUDA_ATTENTION=wgmma \
    "$BIN/tessera" bench dit --device cuda --preset wan-1.3b-2l --latent "$lat" --text-len 512 --warmup 2 --iters "$it"
  step ditoverlap 120 "tessera bench dit --device cuda, TESSERA_CUDA_ATTENTION=wgmma-overlap" env TESSERA_CUDA_ATTENTION=wgmma-overlap \
    "$BIN/tessera" bench dit --device cuda --preset wan-1.3b-2l --latent "$lat" --text-len 512 --warmup 2 --iters "$it"
  # t2v-b has 3 heads, which Ulysses 2 cannot split: it must say UNSUPPORTED (the transformer step
  # runs it over a ring of 3), every other case must pass.
  step goldenusp 90 "tessera golden --backend cuda, dit over 4 ranks on this GPU (USP 2x2, staged collectives)" bash -c \
    "'$BIN/tessera' golden --backend cuda --kind dit --ranks 4 --ulysses 2 tests/golden | tee /tmp/gpu-suite-usp.txt; \
     ! grep -Ev '^dit/t2v-b|^dit +dit/t2v-b' /tmp/gpu-suite-usp.txt | grep -Eq ' (FAIL|ERROR|UNSUPPORTED)' && grep -Eq 'dit/t2v-b .*UNSUPPORTED .*does not divide' /tmp/gpu-suite-usp.txt \
     && grep -q '^4 passed' /tmp/gpu-suite-usp.txt"
  # The stages split across ranks, on this GPU (ranks as threads, staged collectives): the VAE
  # decoded in bands of rows with halo exchanges, and each pipeline with its CFG halves on
  # separate ranks, the latent sharded; every line must say ranks=2 and pass.
  step goldensplit 90 "tessera golden --backend cuda: VAE over 2 ranks, pipelines CFG-parallel over 2 ranks" bash -c \
    "set -o pipefail; '$BIN/tessera' golden --backend cuda --kind vae --ranks 2 tests/golden | tee /tmp/gpu-suite-split.txt \
     && '$BIN/tessera' golden --backend cuda --kind pipeline --ranks 2 --cfg-parallel tests/golden | tee -a /tmp/gpu-suite-split.txt \
     && ! grep -Eq ' (FAIL|ERROR|UNSUPPORTED)' /tmp/gpu-suite-split.txt \
     && ! grep -E ' PASS ' /tmp/gpu-suite-split.txt | grep -qv ' ranks=2 '"
  step textbench 60 "tessera bench text --backend cuda, UMT5-XXL width (2 layers)" "$BIN/tessera" bench text --backend cuda --layers 2 --tokens 25,512 --iters "$it"
  step vaebench 90 "tessera bench vae --backend cuda, Wan 2.1 VAE, 480x832, 2 and 5 latent frames" "$BIN/tessera" bench vae --backend cuda \
    --latent-frames 2,5 --height 480 --width 832
  step vaeref 60 "diffusers AutoencoderKLWan bf16 vs f32 on the golden case (the bf16 VAE bound's yardstick)" python3 bench/vae_bf16_error.py tests/golden/vae/decode-a
  step generate 150 "tessera generate, transformer on cuda vs cpu (tiny preset, 256x256, 33 frames, 20 steps)" bash -c \
    "'$BIN/tessera' generate --device cuda --preset tiny --prompt 'a red ball' --width 256 --height 256 --frames 33 --steps 20 --seed 1 --quiet -o /tmp/gpu-suite-cuda.mp4 \
     && '$BIN/tessera' generate --device cpu --preset tiny --prompt 'a red ball' --width 256 --height 256 --frames 33 --steps 20 --seed 1 --quiet -o /tmp/gpu-suite-cpu.mp4 \
     && ls -la /tmp/gpu-suite-cuda.mp4 /tmp/gpu-suite-cpu.mp4 && cp /tmp/gpu-suite-cuda.mp4 '$OUTDIR/generate-cuda.mp4'"
  # Skips (and says so) on a machine with one GPU: NCCL needs a GPU per rank.
  step nccl 60 "sequence parallelism over NCCL (2+ GPUs): collectives, every plan vs one GPU" "$BIN/gpu_sequence_parallel" --test-threads=1 --nocapture
  if command -v compute-sanitizer >/dev/null; then
    # NCCL's start probes kernels the GPU has no image for (error 209 from cudaFuncGetAttributes,
    # which memcheck counts); its one test is skipped here.
    step memcheck 150 "compute-sanitizer memcheck (kernel tests, GEMMs and NCCL skipped)" compute-sanitizer --tool memcheck --error-exitcode 1 \
      "$BIN/gpu_kernels" --test-threads=1 --skip linear --skip nccl
    # Shared-memory races: the kernels that share tiles or reduce through shared memory.
    step racecheck 150 "compute-sanitizer racecheck (attention, norms, biased attention)" compute-sanitizer --tool racecheck --error-exitcode 1 \
      "$BIN/gpu_kernels" --test-threads=1 flash_attention biased_attention layer_norm qk_norm lse_merge
  else
    SUMMARY+=("SKIP  compute-sanitizer: not on this machine")
  fi
  # The figures at a glance, each with its step: attention TFLOP/s (both Tessera kernels, PyTorch
  # SDPA's backends) and the DiT forward medians (mma, wgmma, wgmma-overlap, diffusers).
  echo; echo "===== figures"
  awk '/^===== \[/ { id = $2 } /^attention \(|^sdpa\[|median/ { print id, $0 }' "$OUTDIR/suite.log"
  echo; echo "===== summary"
  printf '%s\n' "${SUMMARY[@]}"
  ! printf '%s\n' "${SUMMARY[@]}" | grep -qE '^(FAIL|TIMEOUT)'
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
