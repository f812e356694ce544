#!/usr/bin/env bash
# Build the Horovod 0.28.1 wheel with the C++17 patch. Called by scripts/install.sh; usable alone
# (e.g. on an offline GPU box with HOROVOD_SDIST set):
#
#   scripts/build_horovod.sh PYTHON OUT_DIR
#
# PYTHON must import torch. Environment:
#   HVD_RSGC_GPU=auto|0|1    NCCL build (auto: PYTHON's torch is a CUDA build and nvcc is on PATH)
#   HVD_RSGC_MPI=auto|0|1    MPI controller (auto: mpicc on PATH); Gloo is always built
#   HOROVOD_SDIST=FILE       local horovod-0.28.1.tar.gz (default: pip download from PyPI)
#   HOROVOD_CMAKE=FILE       cmake binary (default: the system cmake, not the PyPI shim)
#   HOROVOD_NCCL_HOME / HOROVOD_NCCL_INCLUDE / HOROVOD_NCCL_LIB   NCCL location (default: system,
#                            else the nvidia-nccl wheel that torch itself uses)
#   HOROVOD_BUILD_CUDA_CC_LIST=80,90   GPU architectures to compile (default: all nvcc knows)
set -euo pipefail
PY="$1"; OUT="$2"
VERSION="${HOROVOD_VERSION:-0.28.1}"   # the patch targets 0.28.1's sources
log() { printf '[build_horovod] %s\n' "$*" >&2; }

CMAKE_BIN="${HOROVOD_CMAKE:-$(PATH=/usr/bin:/usr/local/bin:$PATH command -v cmake || true)}"
[ -n "$CMAKE_BIN" ] || { log "ERROR: cmake not found"; exit 1; }
TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
GPU="${HVD_RSGC_GPU:-auto}"
if [ "$GPU" = auto ]; then
    if [ -n "$TORCH_CUDA" ] && command -v nvcc >/dev/null 2>&1; then GPU=1; else GPU=0; fi
fi
MPI="${HVD_RSGC_MPI:-auto}"
if [ "$MPI" = auto ]; then
    if command -v mpicc >/dev/null 2>&1; then MPI=1; else MPI=0; fi
fi

BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
if [ -n "${HOROVOD_SDIST:-}" ]; then
    cp "$HOROVOD_SDIST" "$BUILD/"
else
    "$PY" -m pip --disable-pip-version-check -q download --no-deps --no-binary :all: \
        "horovod==$VERSION" -d "$BUILD"
fi
tar -xzf "$BUILD"/horovod-$VERSION.tar.gz -C "$BUILD"
SRC="$BUILD/horovod-$VERSION"

# The one patch: Horovod 0.28.1 asks CMake for C++14, PyTorch >= 2.1 headers need C++17.
for f in CMakeLists.txt horovod/torch/CMakeLists.txt; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$SRC/$f" || { log "ERROR: patch target missing in $f"; exit 1; }
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)  # hvd_rsgc: PyTorch>=2.1 needs C++17/' "$SRC/$f"
done

# GCC >= 13 no longer includes <string> / <stdexcept> transitively; two headers relied on it.
sed -i 's|^#include <mutex>$|#include <mutex>\n#include <string>  // hvd_rsgc: GCC >= 13|' "$SRC/horovod/common/group_table.h"
sed -i 's|^#include <string>$|#include <string>\n#include <stdexcept>  // hvd_rsgc: GCC >= 13|' "$SRC/horovod/common/common.h"
grep -q "hvd_rsgc: GCC >= 13" "$SRC/horovod/common/group_table.h" "$SRC/horovod/common/common.h" \
    || { log "ERROR: GCC 13 include patch did not apply"; exit 1; }

# CMake >= 4 refuses the cmake_minimum_required(< 3.5) of Horovod's bundled Gloo; this setting
# (read by CMake >= 4, ignored by older ones) restores the old behaviour.
export CMAKE_POLICY_VERSION_MINIMUM=3.5
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
       HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc) -k"
if [ "$MPI" = 1 ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; unset HOROVOD_WITH_MPI; fi
export HOROVOD_CMAKE="$CMAKE_BIN"
if [ "$GPU" = 1 ]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    if [ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}" ] && [ ! -e /usr/include/nccl.h ]; then
        # No system NCCL: use the one torch loads (pip's nvidia-nccl-cu* wheel), linked shared.
        NCCL_DIR="$("$PY" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)"
        if [ -n "$NCCL_DIR" ] && [ -e "$NCCL_DIR/include/nccl.h" ]; then
            mkdir -p "$BUILD/nccl-lib"
            ln -s "$NCCL_DIR"/lib/libnccl.so.* "$BUILD/nccl-lib/"
            ln -s "$(ls "$NCCL_DIR"/lib/libnccl.so.* | head -1)" "$BUILD/nccl-lib/libnccl.so"
            export HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$BUILD/nccl-lib" HOROVOD_NCCL_LINK=SHARED
            log "using torch's NCCL from $NCCL_DIR (shared)"
        fi
    fi
    log "GPU build: HOROVOD_GPU_OPERATIONS=NCCL, torch CUDA $TORCH_CUDA"
else
    unset HOROVOD_GPU_OPERATIONS HOROVOD_GPU_ALLREDUCE || true
    # Horovod's CMake probes for a CUDA compiler whenever nvcc is on PATH and then demands a
    # full toolkit; for a CPU build switch the probe off through a cmake wrapper.
    cat >"$BUILD/cmake-cpu" <<WRAP
#!/bin/sh
case "\$1" in --build|--version|-E|-P) exec "$CMAKE_BIN" "\$@";; esac
exec "$CMAKE_BIN" -DCMAKE_CUDA_COMPILER= -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=TRUE "\$@"
WRAP
    chmod +x "$BUILD/cmake-cpu"
    export HOROVOD_CMAKE="$BUILD/cmake-cpu"
fi
log "building Horovod $VERSION (gpu=$GPU mpi=$MPI) with $("$CMAKE_BIN" --version | head -1)"
"$PY" -m pip --disable-pip-version-check -q wheel --no-build-isolation --no-deps -w "$BUILD/dist" "$SRC"
mkdir -p "$OUT"
mv "$BUILD"/dist/horovod-*.whl "$OUT/"
log "wheel: $(ls "$OUT"/horovod-*.whl)"
