#!/usr/bin/env bash
# README command one: install (idempotent), build the embedded demo set, and train RS-DGC on it
# with a real 4-process Horovod job. Extra arguments are passed on as config overrides,
# e.g.  bash scripts/demo.sh --epochs 3
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$HERE"
bash scripts/install.sh
VENV="${VENV:-$HERE/.venv}"
"$VENV/bin/python" -m hvd_rsgc.app.data.demo
NP="${NP:-4}"
exec "$VENV/bin/horovodrun" -np "$NP" -H "localhost:$NP" --gloo \
    "$VENV/bin/python" -m hvd_rsgc.train --config examples/configs/demo.yaml "$@"
