#!/usr/bin/env bash
# Make promtool (and the prometheus server binary) available for tests/deploy.
#
# Order: promtool on PATH -> the cached copy in ~/.cache/quantmesh/bin -> Debian's `prometheus`
# package. The package is fetched with `apt-get download` and only its two binaries are unpacked
# into the cache: no root needed, no service started, nothing else downloaded, and the .deb is
# kept so a later run re-extracts offline. If that fails, fall back to
# `apt-get install --no-install-recommends prometheus` (root or sudo) and stop the server the
# package's postinst may have started. Prints the path of promtool on its last line.
set -euo pipefail

CACHE_DIR="${QM_CACHE_DIR:-$HOME/.cache/quantmesh}"
BIN_DIR="${QM_CACHE_BIN:-$CACHE_DIR/bin}"
DEB_DIR="$CACHE_DIR/debs"
PROMTOOL="$BIN_DIR/promtool"

if command -v promtool >/dev/null 2>&1; then
    command -v promtool
    exit 0
fi
if [[ -x "$PROMTOOL" ]] && "$PROMTOOL" --version >/dev/null 2>&1; then
    echo "$PROMTOOL"
    exit 0
fi

extract() {
    local deb="$1" tmp
    tmp="$(mktemp -d)"
    dpkg-deb -x "$deb" "$tmp" \
        && mkdir -p "$BIN_DIR" \
        && install -m 0755 "$tmp/usr/bin/promtool" "$BIN_DIR/promtool" \
        && install -m 0755 "$tmp/usr/bin/prometheus" "$BIN_DIR/prometheus"
    local status=$?
    rm -rf "$tmp"
    return "$status"
}

as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        return 1
    fi
}

from_download() {
    command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || return 1
    mkdir -p "$DEB_DIR"
    local deb
    deb="$(find "$DEB_DIR" -maxdepth 1 -name 'prometheus_*.deb' | sort | tail -1)"
    if [[ -z "$deb" ]]; then
        # An empty package list (fresh machine) makes `apt-get download` find nothing.
        if ! (cd "$DEB_DIR" && apt-get download prometheus) >&2; then
            as_root apt-get -o DPkg::Lock::Timeout=180 update >&2 || return 1
            (cd "$DEB_DIR" && apt-get download prometheus) >&2 || return 1
        fi
        deb="$(find "$DEB_DIR" -maxdepth 1 -name 'prometheus_*.deb' | sort | tail -1)"
    fi
    [[ -n "$deb" ]] || return 1
    echo "get-promtool: unpacking $(basename "$deb") into $BIN_DIR" >&2
    extract "$deb"
}

from_install() {
    echo "get-promtool: installing Debian's prometheus package" >&2
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=180 install -y --no-install-recommends prometheus >&2 || return 1
    # The postinst starts the server where an init system runs; the tests only need promtool.
    if [[ -x /etc/init.d/prometheus ]]; then
        as_root /etc/init.d/prometheus stop >&2 || true
    fi
    if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
        as_root systemctl disable --now prometheus >&2 || true
    fi
    mkdir -p "$BIN_DIR"
    ln -sf "$(command -v promtool)" "$PROMTOOL"
}

started=$SECONDS
if ! from_download; then
    echo "get-promtool: download and unpack failed, trying apt-get install" >&2
    if ! from_install; then
        echo "get-promtool: could not get promtool (no apt, no root/sudo, or no network)" >&2
        exit 1
    fi
fi
echo "get-promtool: $("$PROMTOOL" --version 2>&1 | head -1) in $((SECONDS - started))s" >&2
echo "$PROMTOOL"
