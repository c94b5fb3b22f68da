#!/usr/bin/env bash
# Build the pinned helm binary into ~/.cache/quantmesh/bin unless it is already there.
# Used by tests/deploy/test_helm.py (helm lint + helm template) on machines without helm.
# Needs a Go toolchain; the first build takes a few minutes.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.19.0}"
# helm's release Makefile stamps the Kubernetes version its client-go targets (v0.34 -> 1.34)
# into the binary; a bare `go install` would leave the built-in default of 1.20, and `helm
# template` would then refuse charts that require a newer cluster.
HELM_K8S_MINOR="${HELM_K8S_MINOR:-34}"
BIN_DIR="${QM_CACHE_BIN:-$HOME/.cache/quantmesh/bin}"
HELM="$BIN_DIR/helm"

if [[ -x "$HELM" ]] && [[ "$("$HELM" version --template '{{.Version}}' 2>/dev/null)" == "$HELM_VERSION" ]]; then
    echo "helm ${HELM_VERSION} already at $HELM"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "get-helm: no 'go' on PATH; install Go or put a helm ${HELM_VERSION} binary at $HELM" >&2
    exit 1
fi

mkdir -p "$BIN_DIR"
echo "building helm ${HELM_VERSION} into $BIN_DIR (takes a few minutes)..."
ldflags="-w -s -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
for pkg in pkg/chartutil pkg/lint/rules; do
    ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMajor=1"
    ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMinor=${HELM_K8S_MINOR}"
done
GOBIN="$BIN_DIR" CGO_ENABLED=0 \
    go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
"$HELM" version --short
