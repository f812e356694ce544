#!/usr/bin/env bash
# The whole-group route (kernels="grouped") on a GPU in a few minutes, without building
# Horovod: the CUDA tests (every method against the CPU; the grouped route of RS-DGC, Top-k
# and DGC against the CPU's per-layer route), the round-robin compression bench of the
# per-tensor, bucketed-eager and grouped rows, and the CUDA kernels launched per step by each
# route (torch.profiler). Needs a python3 with a CUDA torch and pytest (scripts/gpu_check.sh
# is the full check, Horovod + NCCL build and a training run included).
#   bash scripts/gpu_grouped.sh [OUT_DIR]          (DEVICE=cpu REPEATS=3: a dry run here)
set -uo pipefail
OUT="${1:-${OUT:-/tmp/gpu_grouped}}"; mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
RC=0
DEVICE="${DEVICE:-cuda}"; REPEATS="${REPEATS:-20}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_grouped: DEVICE=cuda but torch sees no GPU (DEVICE=cpu for a dry run)" >&2
    exit 1
fi
ROWS=rsdgc-eager,rsdgc-fused-eager,rsdgc-fused-grouped,topk-eager,topk-fused-eager,topk-fused-grouped,dgc-eager,dgc-fused-eager,dgc-fused-grouped
if [ "$DEVICE" = cuda ]; then
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt" | tail -8
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_grouped: tests/test_cuda.py failed" >&2; RC=1; }
fi
"$PY" -m hvd_rsgc.bench compress --device "$DEVICE" --repeats "$REPEATS" --methods "$ROWS" 2>&1 | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_grouped: bench compress failed" >&2; RC=1; }
ROWS="$ROWS" DEVICE="$DEVICE" "$PY" - <<'EOF' 2>&1 | grep -v '^USDT\|^STAGE' | tee "$OUT/launches.txt"
# per route: CUDA kernels and copies on the device, host syncs (cudaStreamSynchronize / cudaMemcpy D2H) and
# wall time of one step over the ResNet-50 set at density 0.001, after two warm-up steps
import os, time
import torch
from torch.profiler import ProfilerActivity, profile
from hvd_rsgc.bench import _step_fn, build_method, resnet50_shapes
dev = torch.device(os.environ["DEVICE"])
torch.manual_seed(0)
big = [torch.randn(s, device=dev) * 0.01 for s in resnet50_shapes() if len(s) > 1]
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
print(f"{'route':24s} {'gpu ops':>8s} {'syncs':>6s} {'ms':>8s}")
for name in os.environ["ROWS"].split(","):
    comp, m, layers = build_method(name, big, 0.001)
    fn = _step_fn(m, layers, big, {"bytes": 0}, comp)
    fn(); fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter(); fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t)
    with profile(activities=acts) as prof:
        fn()
    evs = prof.events()
    kernels = sum(1 for e in evs if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = sum(1 for e in evs if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize")
                or e.name.startswith("cudaMemcpy") and "Async" not in e.name)
    print(f"{name:24s} {kernels:8d} {syncs:6d} {ms:8.2f}")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_grouped: the launch profile failed" >&2; RC=1; }
echo "results in $OUT (exit $RC)"
exit "$RC"
