#!/usr/bin/env bash
# The README's test command: installs everything it needs (scripts/install.sh is idempotent
# and caches the Horovod wheel), then runs the whole suite, multi-process tests included.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$HERE"
bash scripts/install.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
exec "${VENV:-$HERE/.venv}/bin/python" -m pytest -v -rs tests "$@"
