#!/usr/bin/env bash
# GPU validation on an offline CUDA machine whose python3 already has a CUDA torch (CI has no
# GPU; run by hand): builds Horovod with NCCL through scripts/build_horovod.sh (the installer's
# own build step) from a local sdist, then runs the CUDA tests, the adapter tests, the
# compression benchmark on the GPU and a short GPU training run.
#   HOROVOD_SDIST=path/horovod-0.28.1.tar.gz bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
OUT="${1:-/tmp/gpu_check}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -1
command -v mpicc || echo "no MPI: Gloo-only build"
MPI=0; command -v mpicc >/dev/null && MPI=1
# Horovod's setup.py needs cffi at build time: install carried wheels first (offline box)
if ls .carry/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --target /tmp/hvd_site .carry/*.whl
fi
export PYTHONPATH="/tmp/hvd_site:$PWD"
t0=$(date +%s)
HVD_RSGC_MPI=$MPI HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST:-90}" \
    bash scripts/build_horovod.sh python3 /tmp/hvd_wheel > "$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - t0 ))s"; grep -v "^ *$" "$OUT/build.log" | tail -5
python3 -m pip install -q --no-deps --upgrade --target /tmp/hvd_site /tmp/hvd_wheel/horovod-*.whl
export PYTHONPATH="/tmp/hvd_site:$PWD" PATH="/tmp/hvd_site/bin:$PATH"
horovodrun --check-build | tee "$OUT/check_build.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_algorithms.py tests/test_adapter.py 2>&1 | tail -5
python3 -m hvd_rsgc.bench compress --device cuda --repeats 20 2>&1 | tee "$OUT/bench_cuda.txt"
horovodrun -np 1 python3 -m hvd_rsgc.train --config examples/configs/synthetic.yaml \
    --out_dir /tmp/gpu_runs --run_name gpu --epochs 3 --progress false 2>&1 | tail -12
python3 -c "import torch; c=torch.load('/tmp/gpu_runs/gpu/checkpoints/epoch0002.pt', weights_only=True); print('checkpoint tensors on', {str(v.device) for v in c['model'].values()})"
