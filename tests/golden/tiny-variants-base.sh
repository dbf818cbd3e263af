#!/usr/bin/env bash
# srun_disaggregated.sh: deployment "tiny-variants" (configs/tiny-variants.yaml), rendered by `hpc render`.
# Run it inside an allocation of 3 node(s), from the directory you rendered it in:
#   salloc -N 3 --gres=gpu:4 bash srun_disaggregated.sh
# It starts etcd and NATS and the frontend on the first node and the workers on the others, waits until the
# model is served, and on exit or Ctrl-C cancels exactly its own steps.
#
# Overrides (environment variables, as in Dynamo's srun scripts):
#   IMAGE, MOUNTS                       run every step in this container (pyxis)
#   MODEL_PATH, SERVED_MODEL_NAME       the model directory and the name clients use
#   PREFILL_ENGINE_CONFIG, DECODE_ENGINE_CONFIG   engine YAMLs
#   NUM_PREFILL_WORKERS, NUM_DECODE_WORKERS       how many of the planned workers to start (at most the plan's)
#   NUM_PREFILL_NODES, NUM_DECODE_NODES           nodes per worker; must match the plan (re-render otherwise)
#   NUM_GPUS_PER_NODE                   GPUs per node the plan assumed
#   MODALITY                            text | multimodal
#   PYTHON                              the interpreter with hpc installed (default: python3)
#   FRONTEND_PORT                       the frontend's port (0: a free one)
set -euo pipefail

: "${SLURM_JOB_ID:?run this inside an allocation: salloc -N 3 bash $0}"
IMAGE="${IMAGE:-}"
MOUNTS="${MOUNTS:-}"
MODEL_PATH="${MODEL_PATH:-.hpc/models/tiny-llama}"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-mock-llama}"
PREFILL_ENGINE_CONFIG="${PREFILL_ENGINE_CONFIG:-configs/engines/tiny/mocker.yaml}"
NUM_PREFILL_WORKERS="${NUM_PREFILL_WORKERS:-1}"
NUM_PREFILL_NODES="${NUM_PREFILL_NODES:-1}"
DECODE_ENGINE_CONFIG="${DECODE_ENGINE_CONFIG:-configs/engines/tiny/mocker.yaml}"
NUM_DECODE_WORKERS="${NUM_DECODE_WORKERS:-1}"
NUM_DECODE_NODES="${NUM_DECODE_NODES:-1}"
NUM_GPUS_PER_NODE="${NUM_GPUS_PER_NODE:-4}"
MODALITY="${MODALITY:-text}"
PYTHON="${PYTHON:-python3}"
FRONTEND_PORT="${FRONTEND_PORT:-8000}"
CONFIG="configs/tiny-variants.yaml"
STATE_DIR=".hpc/tiny-variants"
LOG_DIR="$STATE_DIR/logs"
mkdir -p "$LOG_DIR"
rm -f "$STATE_DIR/endpoints.json" "$STATE_DIR/credentials.json" "$STATE_DIR/frontend_url" "$LOG_DIR"/*.log
export HPC_MODALITY="$MODALITY"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if (( ${#NODES[@]} < 3 )); then
  echo "error: this plan needs 3 nodes; the allocation has ${#NODES[@]}" >&2
  exit 1
fi
if (( NUM_PREFILL_WORKERS > 1 )); then
  echo "error: NUM_PREFILL_WORKERS=$NUM_PREFILL_WORKERS but the plan has 1; re-render with a config that has more" >&2
  exit 1
fi
if (( NUM_PREFILL_NODES != 1 )); then
  echo "error: NUM_PREFILL_NODES=$NUM_PREFILL_NODES but the plan places prefill workers on 1 node(s); re-render" >&2
  exit 1
fi
if (( NUM_DECODE_WORKERS > 1 )); then
  echo "error: NUM_DECODE_WORKERS=$NUM_DECODE_WORKERS but the plan has 1; re-render with a config that has more" >&2
  exit 1
fi
if (( NUM_DECODE_NODES != 1 )); then
  echo "error: NUM_DECODE_NODES=$NUM_DECODE_NODES but the plan places decode workers on 1 node(s); re-render" >&2
  exit 1
fi

CONTAINER=()
if [[ -n "$IMAGE" ]]; then
  CONTAINER=(--container-image="$IMAGE")
  [[ -n "$MOUNTS" ]] && CONTAINER+=(--container-mounts="$MOUNTS")
  srun --help | grep -q -- --container-image || { echo "error: IMAGE is set but srun has no --container-image (pyxis)" >&2; exit 1; }
fi

cleanup() {
  trap - EXIT INT TERM
  echo "stopping tiny-variants"
  squeue -h --steps --jobs="$SLURM_JOB_ID" -o "%i %j" | awk '$2 ~ /^hpc\.tiny-variants\./ {print $1}' \
    | xargs -r scancel
  wait
}
trap cleanup EXIT INT TERM

step() {  # step NAME NODES NTASKS_PER_NODE MPI -- COMMAND...
  local name=$1 nodes=$2 per_node=$3 mpi=$4
  shift 5
  local count
  count=$(tr ',' '\n' <<< "$nodes" | wc -l)
  srun --overlap --kill-on-bad-exit=1 --job-name="hpc.tiny-variants.$name" --nodes="$count" \
    --ntasks-per-node="$per_node" --nodelist="$nodes" "$mpi" "${CONTAINER[@]}" "$@" > "$LOG_DIR/$name.log" 2>&1 &
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...
  local what=$1 seconds=$2
  shift 2
  for _ in $(seq $((seconds * 10))); do
    if "$@" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "error: $what not ready after $seconds s; see $LOG_DIR" >&2
  exit 1
}

step head "${NODES[0]}" 1 --mpi=none -- "$PYTHON" -m hpc.head --state-dir "$STATE_DIR" --deployment tiny-variants
wait_for "etcd and NATS" 60 test -s "$STATE_DIR/endpoints.json"
HPC_ETCD=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["etcd"])' "$STATE_DIR/endpoints.json")
HPC_NATS=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["nats"])' "$STATE_DIR/endpoints.json")
HPC_CREDENTIALS="$STATE_DIR/credentials.json"  # the deployment's secrets (mode 600), written by the head step
export HPC_ETCD HPC_NATS HPC_CREDENTIALS
echo "etcd $HPC_ETCD   nats $HPC_NATS"

step frontend "${NODES[0]}" 1 --mpi=none -- "$PYTHON" -m frontend --deployment tiny-variants --host 0.0.0.0 \
  --config "$CONFIG" --port "$FRONTEND_PORT" --router round-robin --model "$SERVED_MODEL_NAME"

# prefill-0: 1 node(s) x 1 rank(s)
if (( NUM_PREFILL_WORKERS > 0 )); then
  step prefill-0 "${NODES[1]}" 1 --mpi=pmix -- \
    "$PYTHON" -m workers --config "$CONFIG" --role prefill --worker-id prefill-0 --model "$MODEL_PATH" \
    --served-name "$SERVED_MODEL_NAME" --engine-config "${PREFILL_ENGINE_CONFIG}"
fi

# decode-0: 1 node(s) x 1 rank(s)
if (( NUM_DECODE_WORKERS > 0 )); then
  step decode-0 "${NODES[2]}" 1 --mpi=pmix -- \
    "$PYTHON" -m workers --config "$CONFIG" --role decode --worker-id decode-0 --model "$MODEL_PATH" \
    --served-name "$SERVED_MODEL_NAME" --engine-config "${DECODE_ENGINE_CONFIG}"
fi

FRONTEND_URL=""
frontend_up() { FRONTEND_URL=$(grep -o 'HPC_FRONTEND_READY [^ ]*' "$LOG_DIR/frontend.log" | cut -d' ' -f2); [[ -n "$FRONTEND_URL" ]]; }
wait_for frontend 60 frontend_up
healthy() { "$PYTHON" -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)' "$FRONTEND_URL"; }
wait_for "workers registered and model served" 600 healthy
echo "ready: model $SERVED_MODEL_NAME at $FRONTEND_URL/v1   (Ctrl-C to stop)"
echo "$FRONTEND_URL" > "$STATE_DIR/frontend_url"
wait
