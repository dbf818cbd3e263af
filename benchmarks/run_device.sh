#!/usr/bin/env bash
# Runs the GPU benchmarks on a machine without internet: the NIXL and msgspec packages come unpacked from
# .carry/site.tgz (see README, "Benchmarks"). Results go to $OUT (or benchmarks/results).
set -uo pipefail
mkdir -p /tmp/site && tar xzf .carry/site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for what in "$@"; do
  case "$what" in
    prefill) python3 benchmarks/prefill.py ;;
    kv) python3 benchmarks/kv_transfer.py ;;
    kv-small) python3 benchmarks/kv_transfer.py --tokens 1024 --layers 2 --repeats 2 ;;
    nixl-probe) python3 benchmarks/nixl_probe.py ;;
    ucx-check) bash benchmarks/ucx_check.sh ;;
  esac
done
