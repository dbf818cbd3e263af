#!/usr/bin/env bash
# srun_disaggregated.sh: deployment "llava-epd" (configs/llava-v1.6-mistral-7b-epd.yaml), rendered by `hpc render`.
# Run it inside an allocation of 2 node(s), from the directory you rendered it in:
#   salloc -N 2 --gres=gpu:4 bash srun_disaggregated.sh
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

: "${SLURM_JOB_ID:?run this inside an allocation: salloc -N 2 bash $0}"
IMAGE="${IMAGE:-nvcr.io/nvidia/tensorrt-llm/release:1.2.0}"
MOUNTS="${MOUNTS:-/models:/models}"
MODEL_PATH="${MODEL_PATH:-/models/llava-v1.6-mistral-7b-hf}"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-llava-hf/llava-v1.6-mistral-7b-hf}"
PREFILL_ENGINE_CONFIG="${PREFILL_ENGINE_CONFIG:-configs/engines/llava-v1.6-mistral-7b/prefill.yaml}"
NUM_PREFILL_WORKERS="${NUM_PREFILL_WORKERS:-2}"
NUM_PREFILL_NODES="${NUM_PREFILL_NODES:-1}"
DECODE_ENGINE_CONFIG="${DECODE_ENGINE_CONFIG:-configs/engines/llava-v1.6-mistral-7b/decode.yaml}"
NUM_DECODE_WORKERS="${NUM_DECODE_WORKERS:-4}"
NUM_DECODE_NODES="${NUM_DECODE_NODES:-1}"
ENCODE_ENGINE_CONFIG="${ENCODE_ENGINE_CONFIG:-configs/engines/llava-v1.6-mistral-7b/encode.yaml}"
NUM_ENCODE_WORKERS="${NUM_ENCODE_WORKERS:-2}"
NUM_ENCODE_NODES="${NUM_ENCODE_NODES:-1}"
NUM_GPUS_PER_NODE="${NUM_GPUS_PER_NODE:-4}"
MODALITY="${MODALITY:-multimodal}"
PYTHON="${PYTHON:-python3}"
FRONTEND_PORT="${FRONTEND_PORT:-8000}"
CONFIG="configs/llava-v1.6-mistral-7b-epd.yaml"
STATE_DIR=".hpc/llava-epd"
LOG_DIR="$STATE_DIR/logs"
mkdir -p "$LOG_DIR"
rm -f "$STATE_DIR/endpoints.json" "$STATE_DIR/credentials.json" "$STATE_DIR/frontend_url" "$LOG_DIR"/*.log
export HPC_MODALITY="$MODALITY"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if (( ${#NODES[@]} < 2 )); then
  echo "error: this plan needs 2 nodes; the allocation has ${#NODES[@]}" >&2
  exit 1
fi
if (( NUM_PREFILL_WORKERS > 2 )); then
  echo "error: NUM_PREFILL_WORKERS=$NUM_PREFILL_WORKERS but the plan has 2; re-render with a config that has more" >&2
  exit 1
fi
if (( NUM_PREFILL_NODES != 1 )); then
  echo "error: NUM_PREFILL_NODES=$NUM_PREFILL_NODES but the plan places prefill workers on 1 node(s); re-render" >&2
  exit 1
fi
if (( NUM_DECODE_WORKERS > 4 )); then
  echo "error: NUM_DECODE_WORKERS=$NUM_DECODE_WORKERS but the plan has 4; re-render with a config that has more" >&2
  exit 1
fi
if (( NUM_DECODE_NODES != 1 )); then
  echo "error: NUM_DECODE_NODES=$NUM_DECODE_NODES but the plan places decode workers on 1 node(s); re-render" >&2
  exit 1
fi
if (( NUM_ENCODE_WORKERS > 2 )); then
  echo "error: NUM_ENCODE_WORKERS=$NUM_ENCODE_WORKERS but the plan has 2; re-render with a config that has more" >&2
  exit 1
fi
if (( NUM_ENCODE_NODES != 1 )); then
  echo "error: NUM_ENCODE_NODES=$NUM_ENCODE_NODES but the plan places encode workers on 1 node(s); re-render" >&2
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
  echo "stopping llava-epd"
  squeue -h --steps --jobs="$SLURM_JOB_ID" -o "%i %j" | awk '$2 ~ /^hpc\.llava-epd\./ {print $1}' \
    | xargs -r scancel
  wait
}
trap cleanup EXIT INT TERM

step() {  # step NAME NODES NTASKS_PER_NODE MPI -- COMMAND...
  local name=$1 nodes=$2 per_node=$3 mpi=$4
  shift 5
  local count
  count=$(tr ',' '\n' <<< "$nodes" | wc -l)
  srun --overlap --kill-on-bad-exit=1 --job-name="hpc.llava-epd.$name" --nodes="$count" \
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

step head "${NODES[0]}" 1 --mpi=none -- "$PYTHON" -m hpc.head --state-dir "$STATE_DIR" --deployment llava-epd
wait_for "etcd and NATS" 60 test -s "$STATE_DIR/endpoints.json"
HPC_ETCD=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["etcd"])' "$STATE_DIR/endpoints.json")
HPC_NATS=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["nats"])' "$STATE_DIR/endpoints.json")
HPC_CREDENTIALS="$STATE_DIR/credentials.json"  # the deployment's secrets (mode 600), written by the head step
export HPC_ETCD HPC_NATS HPC_CREDENTIALS
echo "etcd $HPC_ETCD   nats $HPC_NATS"

step frontend "${NODES[0]}" 1 --mpi=none -- "$PYTHON" -m frontend --deployment llava-epd --host 0.0.0.0 \
  --config "$CONFIG" --port "$FRONTEND_PORT" --router round-robin --model "$SERVED_MODEL_NAME"

# encode-0: 1 node(s) x 1 rank(s), GPUs 0; rank 0 serves, the other ranks run TensorRT-LLM's MPI workers
if (( NUM_ENCODE_WORKERS > 0 )); then
  CUDA_VISIBLE_DEVICES=0 step encode-0 "${NODES[0]}" 1 --mpi=pmix -- \
    trtllm-llmapi-launch "$PYTHON" -m workers --config "$CONFIG" --role encode --worker-id encode-0 --model "$MODEL_PATH" \
    --served-name "$SERVED_MODEL_NAME" --engine-config "${ENCODE_ENGINE_CONFIG}"
fi

# encode-1: 1 node(s) x 1 rank(s), GPUs 1; rank 0 serves, the other ranks run TensorRT-LLM's MPI workers
if (( NUM_ENCODE_WORKERS > 1 )); then
  CUDA_VISIBLE_DEVICES=1 step encode-1 "${NODES[0]}" 1 --mpi=pmix -- \
    trtllm-llmapi-launch "$PYTHON" -m workers --config "$CONFIG" --role encode --worker-id encode-1 --model "$MODEL_PATH" \
    --served-name "$SERVED_MODEL_NAME" --engine-config "${ENCODE_ENGINE_CONFIG}"
fi

# prefill-0: 1 node(s) x 1 rank(s), GPUs 2; rank 0 serves, the other ranks run TensorRT-LLM's MPI workers
if (( NUM_PREFILL_WORKERS > 0 )); then
  CUDA_VISIBLE_DEVICES=2 step prefill-0 "${NODES[0]}" 1 --mpi=pmix -- \
    trtllm-llmapi-launch "$PYTHON" -m workers --config "$CONFIG" --role prefill --worker-id prefill-0 --model "$MODEL_PATH" \
    --served-name "$SERVED_MODEL_NAME" --engine-config "${PREFILL_ENGINE_CONFIG}"
fi

# prefill-1: 1 node(s) x 1 rank(s), GPUs 3; rank 0 serves, the other ranks run TensorRT-LLM's MPI workers
if (( NUM_PREFILL_WORKERS > 1 )); then
  CUDA_VISIBLE_DEVICES=3 step prefill-1 "${NODES[0]}" 1 --mpi=pmix -- \
    trtllm-llmapi-launch "$PYTHON" -m workers --config "$CONFIG" --role prefill --worker-id prefill-1 --model "$MODEL_PATH" \
    --served-name "$SERVED_MODEL_NAME" --engine-config "${PREFILL_ENGINE_CONFIG}"
fi

# decode-0: 1 node(s) x 1 rank(s), GPUs 0; rank 0 serves, the other ranks run TensorRT-LLM's MPI workers
if (( NUM_DECODE_WORKERS > 0 )); then
  CUDA_VISIBLE_DEVICES=0 step decode-0 "${NODES[1]}" 1 --mpi=pmix -- \
    trtllm-llmapi-launch "$PYTHON" -m workers --config "$CONFIG" --role decode --worker-id decode-0 --model "$MODEL_PATH" \
    --served-name "$SERVED_MODEL_NAME" --engine-config "${DECODE_ENGINE_CONFIG}"
fi

# decode-1: 1 node(s) x 1 rank(s), GPUs 1; rank 0 serves, the other ranks run TensorRT-LLM's MPI workers
if (( NUM_DECODE_WORKERS > 1 )); then
  CUDA_VISIBLE_DEVICES=1 step decode-1 "${NODES[1]}" 1 --mpi=pmix -- \
    trtllm-llmapi-launch "$PYTHON" -m workers --config "$CONFIG" --role decode --worker-id decode-1 --model "$MODEL_PATH" \
    --served-name "$SERVED_MODEL_NAME" --engine-config "${DECODE_ENGINE_CONFIG}"
fi

# decode-2: 1 node(s) x 1 rank(s), GPUs 2; rank 0 serves, the other ranks run TensorRT-LLM's MPI workers
if (( NUM_DECODE_WORKERS > 2 )); then
  CUDA_VISIBLE_DEVICES=2 step decode-2 "${NODES[1]}" 1 --mpi=pmix -- \
    trtllm-llmapi-launch "$PYTHON" -m workers --config "$CONFIG" --role decode --worker-id decode-2 --model "$MODEL_PATH" \
    --served-name "$SERVED_MODEL_NAME" --engine-config "${DECODE_ENGINE_CONFIG}"
fi

# decode-3: 1 node(s) x 1 rank(s), GPUs 3; rank 0 serves, the other ranks run TensorRT-LLM's MPI workers
if (( NUM_DECODE_WORKERS > 3 )); then
  CUDA_VISIBLE_DEVICES=3 step decode-3 "${NODES[1]}" 1 --mpi=pmix -- \
    trtllm-llmapi-launch "$PYTHON" -m workers --config "$CONFIG" --role decode --worker-id decode-3 --model "$MODEL_PATH" \
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
