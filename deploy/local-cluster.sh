#!/usr/bin/env bash
# A whole Tessera cluster on this machine, on loopback: a private etcd, N `tessera-worker serve`
# processes (built-in tiny model unless TESSERA_MODEL names a diffusers snapshot) registering in
# it, and a `tessera serve --etcd` coordinator. Ctrl-C (or SIGTERM) stops everything, workers
# first (they drain and revoke their leases).
#
#   bash deploy/local-cluster.sh [WORKERS]        (default 3)
#
# Then, from another shell:
#   cargo run --release --bin tessera -- status --server http://127.0.0.1:50051
#   cargo run --release --bin tessera -- generate --server http://127.0.0.1:50051 --prompt "a red ball" -o out.mp4
#
# Settings (environment): TESSERA_PORT (coordinator, default 50051), TESSERA_WORKER_BASE_PORT
# (default 50061: worker i listens on BASE+2i, collectives on BASE+2i+1), TESSERA_ETCD_PORT (default
# 23790), TESSERA_MODEL / TESSERA_PRESET, TESSERA_THREADS (per worker), TESSERA_MAX_RANKS,
# TESSERA_METRICS_BASE_PORT (default 9464: the coordinator's /metrics, worker i on BASE+1+i),
# TESSERA_DEVICE (cpu, the default, or cuda: worker i on GPU i, the group talking through NCCL),
# TESSERA_BIN_DIR (use the binaries there instead of building release ones), TESSERA_TLS (1, the
# default: a throwaway CA made with openssl signs a certificate for each process, and the
# coordinator and the workers talk mutual TLS; 0: plain HTTP/2).
# Logs, certificates, etcd data and the coordinator's state store (--state: checkpoints, outputs
# kept for `tessera watch`) go to a temporary folder, printed at start.
set -euo pipefail
cd "$(dirname "$0")/.."

workers="${1:-3}"
if ! [[ "$workers" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [WORKERS]  (WORKERS: a positive number, got '$workers')" >&2
  exit 2
fi
port="${TESSERA_PORT:-50051}"
base="${TESSERA_WORKER_BASE_PORT:-50061}"
etcd_port="${TESSERA_ETCD_PORT:-23790}"
metrics="${TESSERA_METRICS_BASE_PORT:-9464}"
threads="${TESSERA_THREADS:-1}"
device="${TESSERA_DEVICE:-cpu}"
if [[ "$device" != cpu && "$device" != cuda ]]; then
  echo "TESSERA_DEVICE: cpu or cuda (worker i then takes GPU i), got '$device'" >&2
  exit 2
fi
command -v etcd >/dev/null || { echo "etcd is not installed: apt-get install -y etcd-server" >&2; exit 1; }

bin="${TESSERA_BIN_DIR:-}"
if [[ -z "$bin" ]]; then
  echo "building the binaries (release)..."
  cargo build --release --locked --bin tessera --bin tessera-worker
  bin="target/release"
fi
dir="$(mktemp -d -t tessera-cluster-XXXXXX)"
echo "logs and etcd data in $dir"

pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping: workers, then the coordinator, then etcd"
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
}
trap "stop; exit 0" INT TERM
trap stop EXIT

# Mutual TLS inside: a throwaway CA (it lives and dies with this folder) and one certificate per
# process, each for 127.0.0.1, where they all listen; etcd serves TLS too and requires client
# certificates of the same CA.
coordinator_tls=()
worker_tls() { :; }
etcd_tls=()
scheme=http
if [[ "${TESSERA_TLS:-1}" == 1 ]]; then
  command -v openssl >/dev/null || { echo "openssl is needed for TESSERA_TLS=1 (or run with TESSERA_TLS=0)" >&2; exit 1; }
  tls="$dir/tls"
  mkdir -p "$tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=tessera-local-ca" \
    -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
  issue() {  # issue NAME: $tls/NAME.crt and NAME.key, signed by the CA, for 127.0.0.1
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
      -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" -keyout "$tls/$1.key" -out "$tls/$1.csr" 2>/dev/null
    openssl x509 -req -in "$tls/$1.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial -days 2 \
      -copy_extensions copy -out "$tls/$1.crt" 2>/dev/null
  }
  issue coordinator
  issue etcd
  coordinator_tls=(--tls-cert "$tls/coordinator.crt" --tls-key "$tls/coordinator.key" --tls-ca "$tls/ca.crt"
    --etcd-ca "$tls/ca.crt" --etcd-cert "$tls/coordinator.crt" --etcd-key "$tls/coordinator.key")
  worker_tls() {
    issue "worker-$1"
    echo --tls-cert "$tls/worker-$1.crt" --tls-key "$tls/worker-$1.key" --tls-ca "$tls/ca.crt" \
      --etcd-ca "$tls/ca.crt" --etcd-cert "$tls/worker-$1.crt" --etcd-key "$tls/worker-$1.key"
  }
  etcd_tls=(--cert-file "$tls/etcd.crt" --key-file "$tls/etcd.key" --trusted-ca-file "$tls/ca.crt" --client-cert-auth)
  scheme=https
  echo "mutual TLS between the coordinator, the workers and etcd (CA in $tls)"
fi

etcd_url="$scheme://127.0.0.1:$etcd_port"
peer_url="http://127.0.0.1:$((etcd_port + 1))"
etcd --name local --data-dir "$dir/etcd" \
  --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" \
  --initial-cluster "local=$peer_url" "${etcd_tls[@]}" >"$dir/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$etcd_port") 2>/dev/null; then break; fi
  sleep 0.1
done
echo "etcd on $etcd_url"

model_flags=()
if [[ -n "${TESSERA_MODEL:-}" ]]; then model_flags=(--model "$TESSERA_MODEL"); else model_flags=(--preset "${TESSERA_PRESET:-tiny}"); fi

"$bin/tessera" serve --listen "127.0.0.1:$port" --etcd "$etcd_url" --cluster local \
  --metrics-listen "127.0.0.1:$metrics" --state "$dir/state" \
  --max-ranks "${TESSERA_MAX_RANKS:-0}" "${coordinator_tls[@]}" >"$dir/coordinator.log" 2>&1 &
pids+=($!)

worker_pids=()
for ((i = 0; i < workers; i++)); do
  listen=$((base + 2 * i))
  worker_device="cpu"
  [[ "$device" == cuda ]] && worker_device="cuda:$i"
  read -r -a tls_flags <<<"$(worker_tls "$i")"
  "$bin/tessera-worker" --threads "$threads" serve "${model_flags[@]}" --device "$worker_device" \
    --listen "127.0.0.1:$listen" --collective "127.0.0.1:$((listen + 1))" \
    --etcd "$etcd_url" --cluster local --worker-id "worker-$i" \
    --metrics-listen "127.0.0.1:$((metrics + 1 + i))" "${tls_flags[@]}" >"$dir/worker-$i.log" 2>&1 &
  pids+=($!)
  worker_pids+=($!)
  echo "worker-$i on 127.0.0.1:$listen (collectives on $((listen + 1)), device $worker_device)"
done

echo "coordinator on 127.0.0.1:$port (metrics: http://127.0.0.1:$metrics/metrics); Ctrl-C stops the cluster"
# Exit (and stop the rest) if any process dies.
while true; do
  for pid in "${pids[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "process $pid exited; see the logs in $dir" >&2
      exit 1
    fi
  done
  sleep 1
done
