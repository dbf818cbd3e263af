#!/usr/bin/env bash
# Runs the GPU benchmarks on a machine without internet: the NIXL and msgspec packages come unpacked from
# .carry/site.tgz (see README, "Benchmarks"). Results go to $OUT (or benchmarks/results).
set -uo pipefail
mkdir -p /tmp/site && if [ -f .carry/site.tgz ]; then tar xzf .carry/site.tgz -C /tmp/site; fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Result names carry the card (h100 or h200): timings from different cards are never compared.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -m1 'h[0-9]\{3\}' | tr 'H' 'h')
gpu=${gpu:-gpu}

serve_setup() {  # the serving stack (wheels) and the etcd and NATS binaries, from .carry/serve (see README)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .carry/serve/*.whl
  mkdir -p /tmp/bin
  for b in etcd nats-server; do gunzip -c ".carry/serve/$b.gz" > "/tmp/bin/$b" && chmod +x "/tmp/bin/$b"; done
}
export PATH=/tmp/bin:$PATH
for what in "$@"; do
  case "$what" in
    prefill) python3 benchmarks/prefill.py ;;
    kv) python3 benchmarks/kv_transfer.py ;;
    kv-small) python3 benchmarks/kv_transfer.py --tokens 1024 --layers 2 --repeats 2 ;;
    nixl-probe) python3 benchmarks/nixl_probe.py ;;
    ucx-check) bash benchmarks/ucx_check.sh ;;
    # Four load-generating processes: on the 16-core host one was the bottleneck at concurrency 64.
    frontend) serve_setup; python3 benchmarks/frontend.py --requests 300 --processes 1,4 --client-processes 4 \
      --name "frontend-$gpu-4clients" ;;
    # The frontend's own cost at concurrency 1 (one client, as the README's row).
    frontend-c1) serve_setup; python3 benchmarks/frontend.py --requests 300 --name "frontend-$gpu-c1" ;;
    serve) serve_setup; python3 benchmarks/serve_gpu.py ;;
    router) serve_setup; python3 benchmarks/router.py ;;
    encode) serve_setup; python3 benchmarks/encode.py ;;
    tune) serve_setup; python3 benchmarks/tune_prefill.py ;;
    decode) python3 benchmarks/decode.py ;;
    # NVIDIA Dynamo's frontend and mocker beside hpc's on the 16-core host: .carry/dynamo (docs/benchmarks.md), carried
    # with .carry/serve and without site.tgz, which would not fit beside it.
    peer-dynamo) serve_setup
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .carry/dynamo/*.whl
      tar xJf .carry/dynamo/dynamo.tar.xz -C /tmp/site
      python3 benchmarks/peer_dynamo.py --dynamo-python python3 --client-processes 4 --rates 1000,2000,3000 \
        --name "${PEER_NAME:-peer_dynamo-$gpu-4clients}" ;;
    decode-profile) python3 benchmarks/decode_profile.py ;;
    # NATS's scheduling policy alternated on one stack (it matters where cores are busy; here they are not).
    nats-policy) serve_setup; python3 benchmarks/nats_policy.py --processes 4 --name nats_policy-h100 ;;
    # The per-token cost of worker, NATS and frontend under a 10 ms decode step, up to 1024 streams.
    token-path) serve_setup
      python3 benchmarks/token_path.py --streams 64,256,1024 --client-processes 4 --name "token_path-$gpu-1proc"
      python3 benchmarks/token_path.py --streams 64,256,1024 --processes 4 --client-processes 4 \
        --name "token_path-$gpu-4proc" ;;
    serve-graphs) serve_setup; python3 benchmarks/serve_gpu.py --cuda-graphs --name "serve_gpu-$gpu-graphs" ;;
    # Long prompts arriving during decodes, at request rates, on one GPU (disaggregated: both workers share it).
    serve-rates) serve_setup; python3 benchmarks/serve_gpu.py --cuda-graphs --isl 4000 --osl 200 --rates 1,2,4,6 \
      --requests 60 --slo-ttft-ms 1000 --slo-itl-ms 50 --name serve_gpu-rates ;;
    two-gpu-embeddings) serve_setup; python3 benchmarks/encode.py --transfer-only --src 0 --dst 1 --name encode-2gpu ;;
    # Two GPUs (nvidia-h200-x2): KV GPU0 -> GPU1, then 1 prefill + 1 decode worker against 2 aggregated workers.
    two-gpu-kv) python3 benchmarks/kv_transfer.py --src 0 --dst 1 ;;
    two-gpu-disaggregated|two-gpu-aggregated)
      serve_setup
      python3 benchmarks/serve_gpu.py --gpus 0,1 --modes "${what#two-gpu-}" --isl 4000 --osl 200 --cuda-graphs \
        --kv-blocks 24576 --rates 1,2,4,6,8 --slo-ttft-ms 1000 --slo-itl-ms 50 --name "serve_gpu-2gpu-${what#two-gpu-}" ;;
    two-gpu-tp) python3 benchmarks/tensor_parallel.py \
      && mpirun -np 2 --allow-run-as-root -x PYTHONPATH -x OUT -x NCCL_NVLS_ENABLE=0 \
        -x TORCH_SYMM_MEM_DISABLE_MULTICAST=1 -x NVSHMEM_DISABLE_NVLS=1 python3 benchmarks/tensor_parallel.py ;;
    two-gpu) "$0" two-gpu-kv two-gpu-embeddings two-gpu-tp two-gpu-disaggregated two-gpu-aggregated ;;
  esac
done
