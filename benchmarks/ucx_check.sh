#!/usr/bin/env bash
# Can UCX's CUDA transports load next to torch? Prints the loader's answer for each UCX CUDA module.
d=/tmp/site/nixl_cu13.libs/ucx
python3 - "$d" <<'PY'
import ctypes, glob, sys
import torch  # loads libcudart the way a worker does
torch.zeros(1, device="cuda")
for lib in sorted(glob.glob(sys.argv[1] + "/*cuda*.so.0.0.0")):
    try:
        ctypes.CDLL(lib)
        print("loads:", lib.rsplit("/", 1)[1])
    except OSError as e:
        print("FAILS:", e)
PY
ldconfig -p | grep -E "libcuda.so.1|libnvidia-ml.so.1|libcudart" | head
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
