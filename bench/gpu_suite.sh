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
# Options for `run` (environment): SANITIZE=0 skips the memcheck, ITERS=n sets timed iterations,
# TOKENS=n the benchmark sequence length, DIT_LATENT=C,F,H,W the transformer benchmark's latent
# (default 16,21,60,104: 32,760 tokens). Exit status: non-zero if any step failed.
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
  # diffusers and its dependencies as wheels (the GPU machine has PyTorch but no network; its
  # Python version is unknown, so binary wheels for 3.10-3.13); `run` installs them offline when
  # diffusers is missing there. Carried only if everything stays within the 64 MiB carry limit.
  local wheels
  wheels=$(mktemp -d)
  for py in 3.10 3.11 3.12 3.13; do
    python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps -d "$wheels" \
      --python-version "$py" --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      diffusers huggingface_hub safetensors regex filelock fsspec tqdm pyyaml packaging typing_extensions \
      importlib_metadata zipp requests urllib3 idna certifi charset_normalizer hf_xet \
      || echo "warning: could not download the diffusers wheels for Python $py"
  done
  if [ $(( $(du -sm "$BIN" | cut -f1) + $(du -sm "$wheels" | cut -f1) )) -le 64 ]; then
    mv "$wheels" "$BIN/wheels"
  else
    echo "warning: the diffusers wheels would take $BIN over 64 MiB: not carried (the GPU machine needs diffusers installed)"
  fi
  du -sh "$BIN"
  [ "$(du -sm "$BIN" | cut -f1)" -le 64 ] || { echo "$BIN is over the 64 MiB the device tool carries"; exit 1; }
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
step() {  # step NAME COMMAND...: runs, records pass/fail
  local name=$1; shift
  echo; echo "===== $name: $*"
  local t0=$SECONDS
  if "$@"; then SUMMARY+=("PASS  $name ($((SECONDS - t0)) s)"); else SUMMARY+=("FAIL  $name ($((SECONDS - t0)) s)"); fi
}

run() {
  for b in gpu_kernels nvrtc_compile tessera-gpu-bench gpu_transformer gpu_sequence_parallel tessera; do
    [ -x "$BIN/$b" ] || { echo "missing $BIN/$b: run 'bench/gpu_suite.sh build' on the build machine and carry $BIN"; exit 2; }
  done
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  setup_libs
  if ! python3 -c "import diffusers" 2>/dev/null && [ -d "$BIN/wheels" ]; then
    python3 -m pip install --quiet --no-index --find-links "$BIN/wheels" diffusers || echo "warning: diffusers could not be installed offline"
  fi
  export TESSERA_REQUIRE_GPU=1 RUST_BACKTRACE=1
  step "kernels vs CPU twins" "$BIN/gpu_kernels" --test-threads=1 --nocapture
  step "NVRTC + ptxas compile check (this machine's CUDA)" "$BIN/nvrtc_compile" --nocapture
  if [ "${SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
    step "compute-sanitizer memcheck (kernel tests, GEMMs skipped)" compute-sanitizer --tool memcheck --error-exitcode 1 \
      "$BIN/gpu_kernels" --test-threads=1 --skip linear
    # Shared-memory races: the kernels that share tiles or reduce through shared memory.
    step "compute-sanitizer racecheck (attention, norms, biased attention)" compute-sanitizer --tool racecheck --error-exitcode 1 \
      "$BIN/gpu_kernels" --test-threads=1 flash_attention biased_attention layer_norm qk_norm lse_merge
  fi
  step "tessera-gpu-bench" "$BIN/tessera-gpu-bench" --tokens "${TOKENS:-32760}" --iters "${ITERS:-10}"
  step "PyTorch SDPA, 12 heads of 128" python3 bench/sdpa_attention.py --tokens "${TOKENS:-32760}" --heads 12 --head-dim 128 --iters "${ITERS:-10}"
  step "PyTorch SDPA, 24 heads of 64" python3 bench/sdpa_attention.py --tokens "${TOKENS:-32760}" --heads 24 --head-dim 64 --iters "${ITERS:-10}"
  step "bf16 transformer: golden cases, CUDA vs CPU and vs host emulation" "$BIN/gpu_transformer" --test-threads=1 --nocapture
  # Every golden kind with its models on the GPU (dit, umt5, vae and pipeline in bf16; the
  # scheduler's arithmetic on the host), at the bf16 tolerances the CLI prints.
  step "tessera golden --backend cuda, every kind" "$BIN/tessera" golden --backend cuda tests/golden
  step "tessera golden --backend cuda, dit over 4 ranks on this GPU (USP 2x2, staged collectives)" \
    "$BIN/tessera" golden --backend cuda --kind dit --ranks 4 --ulysses 2 tests/golden
  # Skips (and says so) on a machine with one GPU: NCCL needs a GPU per rank.
  step "sequence parallelism over NCCL (2+ GPUs): collectives, every plan vs one GPU" "$BIN/gpu_sequence_parallel" --test-threads=1 --nocapture
  step "tessera bench dit --device cuda, Wan 2.1-1.3B width (2 blocks)" "$BIN/tessera" bench dit --device cuda \
    --preset wan-1.3b-2l --latent "${DIT_LATENT:-16,21,60,104}" --text-len 512 --warmup 2 --iters "${ITERS:-10}"
  step "tessera bench text --backend cuda, UMT5-XXL width (2 layers)" "$BIN/tessera" bench text --backend cuda --layers 2 --tokens 25,512 --iters "${ITERS:-10}"
  step "tessera bench vae --backend cuda, Wan 2.1 VAE, 480x832, 2 and 5 latent frames" "$BIN/tessera" bench vae --backend cuda \
    --latent-frames 2,5 --height 480 --width 832
  step "diffusers AutoencoderKLWan bf16 vs f32 on the golden case (the bf16 VAE bound's yardstick)" python3 bench/vae_bf16_error.py tests/golden/vae/decode-a
  step "diffusers WanTransformer3DModel bf16, same config and shapes" python3 bench/diffusers_dit_gpu.py \
    --preset wan-1.3b-2l --latent "${DIT_LATENT:-16,21,60,104}" --text-len 512 --warmup 2 --iters "${ITERS:-10}"
  step "tessera generate, transformer on cuda vs cpu (tiny preset, 256x256, 33 frames, 20 steps)" bash -c \
    "'$BIN/tessera' generate --device cuda --prompt 'a red ball' --width 256 --height 256 --frames 33 --steps 20 --seed 1 --quiet -o /tmp/gpu-suite-cuda.mp4 \
     && '$BIN/tessera' generate --device cpu --prompt 'a red ball' --width 256 --height 256 --frames 33 --steps 20 --seed 1 --quiet -o /tmp/gpu-suite-cpu.mp4"
  echo; echo "===== summary"
  printf '%s\n' "${SUMMARY[@]}"
  ! printf '%s\n' "${SUMMARY[@]}" | grep -q '^FAIL'
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) sed -n '2,21p' "$0"; exit 2 ;;
esac
