#!/usr/bin/env bash
# Build the pinned kustomize binary into ~/.cache/quantmesh/bin unless it is already there.
# Used by tests/deploy/test_k8s.py (kustomize build of the dev and prod overlays) on machines
# without kustomize. Needs a Go toolchain; the first build takes a minute or two.
set -euo pipefail

KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.7.1}"
BIN_DIR="${QM_CACHE_BIN:-$HOME/.cache/quantmesh/bin}"
KUSTOMIZE="$BIN_DIR/kustomize"

# `kustomize version` prints the module version only when built with one; a go-installed
# binary does, so compare against it to rebuild after a pin change.
if [[ -x "$KUSTOMIZE" ]] && [[ "$("$KUSTOMIZE" version 2>/dev/null)" == "$KUSTOMIZE_VERSION" ]]; then
    echo "kustomize ${KUSTOMIZE_VERSION} already at $KUSTOMIZE"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "get-kustomize: no 'go' on PATH; install Go or put a kustomize ${KUSTOMIZE_VERSION} binary at $KUSTOMIZE" >&2
    exit 1
fi

mkdir -p "$BIN_DIR"
echo "building kustomize ${KUSTOMIZE_VERSION} into $BIN_DIR..."
GOBIN="$BIN_DIR" CGO_ENABLED=0 \
    go install -trimpath -ldflags "-w -s" "sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}"
"$KUSTOMIZE" version
