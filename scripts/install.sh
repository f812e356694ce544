#!/usr/bin/env bash
# hvd_rsgc one-shot installer for a fresh Debian/Ubuntu machine with Python 3.11.
#
#   scripts/install.sh            # CPU: Open MPI, venv, CPU torch, patched Horovod (PyTorch+Gloo+MPI)
#   HVD_RSGC_GPU=1 scripts/install.sh   # CUDA machine: CUDA torch + Horovod with NCCL
#
# Idempotent: a second run re-uses the venv and the cached Horovod wheel.
# Environment knobs (all optional):
#   VENV=.venv                 where the virtualenv lives
#   PYTHON=python3.11          interpreter used to create it (falls back to python3)
#   TORCH_SPEC=torch==2.13.0   the torch requirement to install
#   TORCH_INDEX_URL=...        index for torch (e.g. PyTorch's CPU or CUDA wheel index)
#   HVD_RSGC_MPI=1|0           build Horovod's MPI controller (0: Gloo only, no Open MPI needed)
#   HVD_RSGC_GPU=auto|0|1      build Horovod with HOROVOD_GPU_OPERATIONS=NCCL (auto: torch is a
#                              CUDA build and nvcc is on PATH)
#   HVD_RSGC_CACHE=~/.cache/hvd_rsgc   where the built Horovod wheel is cached
#   HVD_RSGC_SKIP_APT=1        never call apt-get (you provide MPI yourself)
#   HVD_RSGC_WHEELHOUSE=DIR    local wheels for offline / air-gapped installs (the Dockerfiles'
#                              wheelhouse/): pip --find-links DIR (e.g. the CPU torch wheel), and
#                              DIR/<cache key>/horovod-*.whl is used instead of building Horovod
#                              (<cache key> as under $HVD_RSGC_CACHE/wheels/, e.g.
#                              horovod-0.28.1-torch2.13.0-cp311-cpu)
#   HVD_RSGC_DEPS_ONLY=1       stop before installing hvd_rsgc itself (the Dockerfiles' dependency
#                              layer, built before the project's code is copied in)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$HERE"
VENV="${VENV:-$HERE/.venv}"
HOROVOD_VERSION=0.28.1
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CACHE="${HVD_RSGC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_rsgc}"
log() { printf '[install] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- 0. Python, before anything is installed
# (`|| true`: under errexit a failed lookup would end the script without a word)
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
if [ -z "$PYTHON" ] || ! command -v "$PYTHON" >/dev/null 2>&1; then
    log "ERROR: no Python interpreter: ${PYTHON:-neither python3.11 nor python3 is on PATH};" \
        "install Python 3.11 (Debian/Ubuntu: apt-get install python3.11 python3.11-venv python3.11-dev)" \
        "or point PYTHON= at one"
    exit 1
fi

# ---------------------------------------------------------------- 1. Open MPI (system)
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# apt-get waiting up to 10 min for another dpkg run (a fresh VM's unattended upgrades)
apt_get() { DEBIAN_FRONTEND=noninteractive as_root apt-get -o DPkg::Lock::Timeout=600 "$@"; }
if [ "${HVD_RSGC_MPI:-1}" = 0 ]; then
    log "HVD_RSGC_MPI=0: Gloo-only Horovod, no MPI"
elif command -v mpicc >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1; then
    log "MPI found: $(command -v mpicc) (skipping apt; e.g. 'module load openmpi' on clusters)"
elif [ "${HVD_RSGC_SKIP_APT:-0}" = 1 ]; then
    log "ERROR: no mpicc/mpirun on PATH and HVD_RSGC_SKIP_APT=1"; exit 1
else
    log "installing Open MPI from system packages"
    export DEBIAN_FRONTEND=noninteractive
    apt_get update -qq
    apt_get install -y -qq --no-install-recommends libopenmpi-dev openmpi-bin g++ make cmake >/dev/null
fi
# Horovod needs CMake >= 3.13; the PyPI 'cmake' shim breaks inside build envs, so use the system one.
CMAKE_BIN="${HOROVOD_CMAKE:-$(PATH=/usr/bin:/usr/local/bin:$PATH command -v cmake || true)}"
if [ -z "$CMAKE_BIN" ]; then
    if [ "${HVD_RSGC_SKIP_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "ERROR: cmake (>= 3.13) not found; install it or set HOROVOD_CMAKE=/path/to/cmake"; exit 1
    fi
    log "installing cmake from system packages"
    apt_get update -qq                 # a fresh image has no package lists
    apt_get install -y -qq --no-install-recommends cmake >/dev/null
    CMAKE_BIN=/usr/bin/cmake
fi

# ---------------------------------------------------------------- 2. virtualenv + Python deps
# A distribution's Python often lacks venv/ensurepip and the headers Horovod's build needs
# (Debian/Ubuntu: python3.X-venv, python3.X-dev); install them when missing.
PYVER="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if ! "$PYTHON" -c 'import ensurepip, sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
    if [ "${HVD_RSGC_SKIP_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "ERROR: $PYTHON lacks venv/ensurepip or its C headers (Python.h); install python$PYVER-venv and python$PYVER-dev"
        exit 1
    fi
    log "installing python$PYVER-venv and python$PYVER-dev"
    apt_get update -qq
    apt_get install -y -qq --no-install-recommends \
        "python$PYVER-venv" "python$PYVER-dev" >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
WHEELHOUSE="${HVD_RSGC_WHEELHOUSE:-}"
[ -n "$WHEELHOUSE" ] && export PIP_FIND_LINKS="$WHEELHOUSE${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}"
"${PIP[@]}" install --upgrade "pip>=23" setuptools wheel

torch_args=("$TORCH_SPEC")
[ -n "${TORCH_INDEX_URL:-}" ] && torch_args+=(--index-url "$TORCH_INDEX_URL")
if ! "$PY" -c "import torch" 2>/dev/null; then
    log "installing ${torch_args[*]}"
    "${PIP[@]}" install "${torch_args[@]}"
fi
"${PIP[@]}" install "numpy" "mpi4py>=3.1" "pytest>=7" "pyyaml" "tqdm" "Pillow" "matplotlib" cloudpickle psutil packaging "cffi>=1.4"

TORCH_VER="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
# GPU build iff torch is a CUDA build (a CPU torch next to a stray nvcc must still give a CPU build).
GPU="${HVD_RSGC_GPU:-auto}"
if [ "$GPU" = auto ]; then
    if [ -n "$TORCH_CUDA" ] && command -v nvcc >/dev/null 2>&1; then GPU=1; else GPU=0; fi
fi
if [ "$GPU" = 0 ] && [ -n "$TORCH_CUDA" ]; then
    log "WARNING: torch is a CUDA build ($TORCH_CUDA) but no GPU build was chosen: Horovod's CMake may want a CUDA toolkit."
    log "         On CPU machines install the CPU build (TORCH_SPEC=torch==2.13.0, or PyTorch's CPU index)."
fi
MPI="${HVD_RSGC_MPI:-1}"
PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
VARIANT=cpu; [ "$GPU" = 1 ] && VARIANT="cuda${TORCH_CUDA:-unknown}"
[ "$MPI" = 1 ] || VARIANT="$VARIANT-nompi"

# ---------------------------------------------------------------- 3. Horovod, patched sdist build
# Horovod 0.28.1 asks CMake for C++14; PyTorch >= 2.1 headers need C++17 (fixed upstream after
# the release). scripts/build_horovod.sh patches exactly the two `set(CMAKE_CXX_STANDARD 14)`
# lines and builds the wheel; it is cached, keyed by Horovod, torch, Python and variant.
WHEEL_DIR="$CACHE/wheels/horovod-$HOROVOD_VERSION-torch$TORCH_VER-$PYTAG-$VARIANT"
have_horovod() {
    HOROVOD_VERSION="$HOROVOD_VERSION" HVD_RSGC_MPI="$MPI" HVD_RSGC_GPU="$GPU" "$PY" - <<'PYEOF' 2>/dev/null
import os, horovod, horovod.torch as hvd
assert horovod.__version__ == os.environ["HOROVOD_VERSION"]
assert hvd.gloo_built()
assert hvd.mpi_built() == (os.environ["HVD_RSGC_MPI"] == "1")
assert hvd.nccl_built() == (os.environ["HVD_RSGC_GPU"] == "1")
PYEOF
}
if have_horovod; then
    log "Horovod $HOROVOD_VERSION already installed in $VENV"
else
    if [ -n "$WHEELHOUSE" ] && ls "$WHEELHOUSE/$(basename "$WHEEL_DIR")"/horovod-*.whl >/dev/null 2>&1; then
        WHEEL_DIR="$WHEELHOUSE/$(basename "$WHEEL_DIR")"
        log "using the wheelhouse's wheel in $WHEEL_DIR"
    elif ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
        log "building Horovod $HOROVOD_VERSION from sdist (variant $VARIANT; ~3 min on 2 cores)"
        HOROVOD_VERSION="$HOROVOD_VERSION" HVD_RSGC_GPU="$GPU" HVD_RSGC_MPI="$MPI" HOROVOD_CMAKE="$CMAKE_BIN" \
            bash "$HERE/scripts/build_horovod.sh" "$PY" "$WHEEL_DIR"
    else
        log "using cached wheel in $WHEEL_DIR"
    fi
    "${PIP[@]}" install --force-reinstall --no-deps "$WHEEL_DIR"/horovod-*.whl
    # horovodrun --check-build exits 0 whatever it finds: the import itself is the check
    have_horovod || { log "ERROR: the installed Horovod does not import with torch, Gloo$([ "$MPI" = 1 ] && echo ", MPI")$([ "$GPU" = 1 ] && echo ", NCCL") (python -c 'import horovod.torch' shows why)"; exit 1; }
fi

# ---------------------------------------------------------------- 4. hvd_rsgc itself
if [ "${HVD_RSGC_DEPS_ONLY:-0}" = 1 ]; then
    log "HVD_RSGC_DEPS_ONLY=1: dependencies installed, hvd_rsgc itself not"
else
    "${PIP[@]}" install --no-deps --no-build-isolation -e "$HERE"
fi
"$VENV/bin/horovodrun" --check-build
log "done: activate with 'source $VENV/bin/activate'"
