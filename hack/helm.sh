#!/usr/bin/env bash
# Builds helm once from its Go module (helm.sh/helm/v3) into a cache outside the work tree,
# keyed by version, and prints the binary's path:
#
#   helm=$(hack/helm.sh)
#
# VGPU_TOOLS_CACHE (default ~/.cache/vgpu-dra/tools) is the cache; a directory without the stamp
# written after a complete build is rebuilt, never half-used.
set -euo pipefail
HELM_VERSION=v3.19.5
cache=${VGPU_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vgpu-dra/tools}
dir=$cache/helm-$HELM_VERSION
if [ "$(cat "$dir/.complete" 2>/dev/null)" != "$HELM_VERSION" ]; then
  echo "hack/helm.sh: building helm $HELM_VERSION (first time only; cached in $dir)" >&2
  rm -rf "$dir"
  mkdir -p "$dir/bin"
  started=$SECONDS
  # `helm version` reports what its release builds stamp.
  GOFLAGS= GOTOOLCHAIN=local GOBIN="$dir/bin" go install \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  echo "$HELM_VERSION" > "$dir/.complete"
  echo "hack/helm.sh: built helm in $((SECONDS - started)) s" >&2
fi
echo "$dir/bin/helm"
