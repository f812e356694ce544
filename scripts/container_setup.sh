#!/usr/bin/env bash
# Make this machine able to build and run the project's OCI images with no registry reachable
# (Debian/Ubuntu, as root; see README "Containers").
#
#   scripts/container_setup.sh [all]     # engine + containers.conf + base image + docker socket + wheelhouse
#   scripts/container_setup.sh engine    # apt: podman buildah runc debootstrap; containers.conf ulimits
#   scripts/container_setup.sh base      # debian:bookworm-slim, made offline if the engine lacks it
#   scripts/container_setup.sh socket    # no docker daemon: start `podman system service` for the docker CLI
#   scripts/container_setup.sh wheelhouse  # stage the CPU torch wheel + the built Horovod wheel
#   scripts/container_setup.sh stop      # stop the podman service this script started
#
# `socket` and `all` print the line to eval, e.g.  eval "$(scripts/container_setup.sh)"
#   export DOCKER_HOST=unix:///run/hvd_rsgc/podman.sock
# after which the README's `docker build` / `docker run` commands go to podman.
# Environment: HVD_RSGC_SKIP_APT=1 (never apt-get), HVD_RSGC_PODMAN_SOCK (socket path),
# VENV (the venv whose torch / Horovod wheels are staged; default <repo>/.venv),
# HVD_RSGC_CACHE (where install.sh cached the Horovod wheel).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[container_setup] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
# apt-get waiting up to 10 min for another dpkg run (a fresh VM's unattended upgrades)
apt_get() { DEBIAN_FRONTEND=noninteractive as_root apt-get -o DPkg::Lock::Timeout=600 "$@"; }
SOCK="${HVD_RSGC_PODMAN_SOCK:-/run/hvd_rsgc/podman.sock}"
PIDFILE="$(dirname "$SOCK")/podman-service.pid"
CONF="${CONTAINERS_CONF:-/etc/containers/containers.conf}"   # podman reads CONTAINERS_CONF too

engine() {
    local missing=()
    for exe in podman buildah runc debootstrap; do
        command -v "$exe" >/dev/null 2>&1 || [ -x "/usr/sbin/$exe" ] || missing+=("$exe")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        [ "${HVD_RSGC_SKIP_APT:-0}" != 1 ] || { log "ERROR: missing ${missing[*]} and HVD_RSGC_SKIP_APT=1"; return 1; }
        log "installing ${missing[*]} (Debian packages)"
        apt_get update -qq
        # with Recommends (slirp4netns, uidmap, catatonit, ...): the set verified on Debian 12
        apt_get install -y -qq podman buildah runc debootstrap >/dev/null
    fi
    # Without default ulimits every container fails here with "error setting rlimit type 7:
    # operation not permitted" (the engine tries to raise nofile/nproc beyond what is allowed).
    # Only add what is missing; other settings in an existing file are kept.
    as_root mkdir -p "$(dirname "$CONF")"
    if [ ! -e "$CONF" ]; then
        log "writing $CONF (default_ulimits, cgroupfs, runc)"
        as_root tee "$CONF" >/dev/null <<'EOF'
# written by hvd_rsgc scripts/container_setup.sh
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
EOF
    elif ! grep -Eq '^[[:space:]]*default_ulimits[[:space:]]*=' "$CONF"; then
        log "adding default_ulimits to the [containers] table of $CONF"
        local line='default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]  # hvd_rsgc container_setup.sh'
        if grep -Eq '^[[:space:]]*\[containers\]' "$CONF"; then
            as_root sed -i "0,/^[[:space:]]*\[containers\]/s//[containers]\n$line/" "$CONF"
        else
            # a table added at the top keeps the keys of the first table in the file theirs
            as_root sed -i "1i [containers]\n$line\n" "$CONF"
        fi
    fi
    podman info --format '{{.Version.Version}}' >/dev/null \
        || { log "ERROR: podman does not work here (podman info failed)"; return 1; }
    log "podman $(podman version --format '{{.Client.Version}}'), config $CONF"
}

base() { bash "$HERE/scripts/container_base.sh"; }

docker_ok() { command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; }

socket() {
    if [ -z "${DOCKER_HOST:-}" ] && docker_ok; then
        log "a docker daemon answers: the docker CLI uses it"
        return 0
    fi
    if [ -S "$SOCK" ] && [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        log "podman service already running (pid $(cat "$PIDFILE"), $SOCK)"
    else
        as_root mkdir -p "$(dirname "$SOCK")"
        rm -f "$SOCK"
        # --time=0: no idle timeout; stopped with `container_setup.sh stop` (by its pid)
        setsid podman system service --time=0 "unix://$SOCK" \
            >"$(dirname "$SOCK")/podman-service.log" 2>&1 </dev/null &
        echo $! >"$PIDFILE"
        for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
        [ -S "$SOCK" ] || { log "ERROR: podman system service did not create $SOCK"; return 1; }
        log "podman system service started (pid $(cat "$PIDFILE")) on $SOCK"
    fi
    echo "export DOCKER_HOST=unix://$SOCK"
}

stop() {
    if [ -f "$PIDFILE" ]; then
        local pid; pid="$(cat "$PIDFILE")"
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            log "stopped podman system service (pid $pid)"
        fi
        rm -f "$PIDFILE" "$SOCK"
    fi
}

# The build context's wheelhouse/ (ignored by git, seen by the Dockerfiles through a bind mount
# of one RUN step, so the wheels do not end up in the image): pip --find-links for that step,
# and a Horovod wheel in a folder named like install.sh's cache key, used instead of building.
wheelhouse() {
    local venv="${VENV:-$HERE/.venv}" wh="$HERE/wheelhouse"
    local py="$venv/bin/python"
    [ -x "$py" ] || { log "no venv at $venv (run scripts/install.sh first): nothing staged"; return 0; }
    mkdir -p "$wh"
    local tv; tv="$("$py" -c 'import torch; print(torch.__version__)')"
    if [ -z "$("$py" -c 'import torch; print(torch.version.cuda or "")')" ]; then
        local base="${tv%%+*}" name
        if ! ls "$wh"/torch-"${tv//+/[+]}"-*.whl >/dev/null 2>&1; then
            # pip's own resolution on this host (its find-links / index config) gives the CPU wheel
            log "staging the torch $tv wheel"
            "$py" -m pip --disable-pip-version-check -q download --no-deps -d "$wh.tmp" "torch==$base" \
                || { log "WARNING: could not fetch the torch wheel; the image will take torch from its index"; rm -rf "$wh.tmp"; }
            if [ -d "$wh.tmp" ]; then
                for name in "$wh.tmp"/torch-*.whl; do
                    case "$(basename "$name")" in
                        torch-"$tv"-*) ln -f "$name" "$wh/" 2>/dev/null || cp "$name" "$wh/" ;;
                        *) log "WARNING: pip offered $(basename "$name"), not torch $tv: not staged" ;;
                    esac
                done
                rm -rf "$wh.tmp"
            fi
        fi
    else
        log "the venv's torch is a CUDA build ($tv): no torch wheel staged for the CPU image"
    fi
    local cache="${HVD_RSGC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_rsgc}"
    local key
    for key in "$cache"/wheels/horovod-*-cpu; do
        if ! ls "$key"/horovod-*.whl >/dev/null 2>&1; then continue; fi
        mkdir -p "$wh/$(basename "$key")"
        cp -u "$key"/horovod-*.whl "$wh/$(basename "$key")/"
        log "staged $(basename "$key")/$(cd "$key" && ls horovod-*.whl)"
    done
    du -sh "$wh" | sed 's/^/[container_setup] wheelhouse: /' >&2
}

case "${1:-all}" in
    engine) engine ;;
    base) base ;;
    socket) socket ;;
    wheelhouse) wheelhouse ;;
    stop) stop ;;
    all) engine; base; wheelhouse; socket ;;
    *) log "usage: $0 [all|engine|base|socket|wheelhouse|stop]"; exit 2 ;;
esac
