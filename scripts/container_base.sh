#!/usr/bin/env bash
# Make the base image `debian:bookworm-slim` locally when the engine does not have it and no
# image registry is reachable: a minimal Debian 12 root file system from this machine's apt
# mirror (debootstrap --variant=minbase), this host's extra CA certificates copied in (so that
# pip inside a build trusts the same TLS proxies the host does, once the Dockerfile installs
# `ca-certificates`), trimmed, and imported with `podman import`. As root; ~2 min, once.
#
#   scripts/container_base.sh            # no-op when the engine already has the image
#   FORCE=1 scripts/container_base.sh    # remake it
# Environment: BASE_IMAGE (default debian:bookworm-slim), SUITE (bookworm), MIRROR (default:
# the first URIs: line of /etc/apt/sources.list.d/debian.sources or deb line of
# /etc/apt/sources.list, else http://deb.debian.org/debian), ENGINE (podman).
set -euo pipefail
log() { printf '[container_base] %s\n' "$*" >&2; }
BASE_IMAGE="${BASE_IMAGE:-debian:bookworm-slim}"
SUITE="${SUITE:-bookworm}"
ENGINE="${ENGINE:-podman}"

if [ "${FORCE:-0}" != 1 ] && "$ENGINE" image exists "$BASE_IMAGE" 2>/dev/null; then
    log "$BASE_IMAGE already present"
    exit 0
fi
[ "$(id -u)" = 0 ] || { log "ERROR: debootstrap needs root"; exit 1; }
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] \
    || { log "ERROR: debootstrap not installed (scripts/container_setup.sh engine)"; exit 1; }

if [ -z "${MIRROR:-}" ]; then
    if [ -r /etc/apt/sources.list.d/debian.sources ]; then
        MIRROR="$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
    fi
    if [ -z "${MIRROR:-}" ] && [ -r /etc/apt/sources.list ]; then
        MIRROR="$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)"
    fi
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
fi

ROOTFS="$(mktemp -d /var/tmp/hvd_rsgc-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
log "debootstrap --variant=minbase $SUITE from $MIRROR (~1.5 min)"
PATH="$PATH:/usr/sbin:/sbin" debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" \
    >"$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log" >&2; log "ERROR: debootstrap failed (log $ROOTFS.log)"; exit 1; }
rm -f "$ROOTFS.log"

# apt inside the image uses the same mirror as this host (and its security suite if configured)
{
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    SEC="$(awk '/^URIs:/ && $2 ~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    [ -n "$SEC" ] && echo "deb $SEC $SUITE-security main"
} >"$ROOTFS/etc/apt/sources.list"

# This host's extra CA certificates (TLS interception proxies); update-ca-certificates in the
# image (run by the ca-certificates package the Dockerfile installs) adds them to the bundle.
mkdir -p "$ROOTFS/usr/local/share/ca-certificates"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
    log "copied $(find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' | wc -l) CA certificate(s) from this host"
fi

# trim to something like the official -slim image
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/var/log/*.log "$ROOTFS"/var/log/apt/* "$ROOTFS"/tmp/* 2>/dev/null || true
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true

# as the official -slim images do: later apt installs leave documentation and translations out
mkdir -p "$ROOTFS/etc/dpkg/dpkg.cfg.d"
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF

tar --numeric-owner -C "$ROOTFS" -c . \
    | "$ENGINE" import --quiet --change 'CMD ["bash"]' --message "debootstrap minbase $SUITE ($MIRROR)" - "$BASE_IMAGE" >/dev/null
log "imported $BASE_IMAGE ($("$ENGINE" image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
