#!/usr/bin/env bash
# The test control plane, from the Go module proxy at the versions pinned in scripts/control-plane-versions.env:
#   - Argo Workflows' full CRDs (manifests/base/crds/full/ of the Argo module), which the manifest and executor tests
#     validate against.
# Everything goes to a cache folder outside the repository (BATCH_GATEWAY_CONTROL_PLANE_CACHE, default
# ~/.cache/batch-gateway/control-plane/), one sub-folder per pinned version, so a second run takes a second or two.
# Needs Go (the version go.mod files ask for) and the Go module proxy; nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=control-plane-versions.env
source scripts/control-plane-versions.env

CACHE="${BATCH_GATEWAY_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/batch-gateway/control-plane}"
ARGO_DIR="$CACHE/argo-$ARGO_VERSION"
ARGO_MODULE=github.com/argoproj/argo-workflows/v4

started=$(date +%s)
say() { echo "==> control plane: $*"; }
fail() { echo "ERROR: install-control-plane: $*" >&2; exit 1; }

command -v go >/dev/null || fail "needs Go (go1.26 or newer) on the PATH, with the Go module proxy reachable"

# module_dir MODULE@VERSION: download a module through the Go module proxy (cached by Go) and print its folder.
module_dir() {
  local json dir
  json=$(GOFLAGS=-mod=mod go mod download -json "$1") || fail "go mod download $1 failed:\n$json"
  dir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")
  [ -d "$dir" ] || fail "go mod download $1 gave no folder:\n$json"
  echo "$dir"
}

# step NAME DONE_FILE FUNCTION: run FUNCTION unless DONE_FILE exists; say how long it took.
step() {
  local name=$1 done_file=$2 fn=$3 t0
  if [ -e "$done_file" ]; then
    say "$name: cached"
    return
  fi
  t0=$(date +%s)
  say "$name..."
  "$fn"
  [ -e "$done_file" ] || fail "$name produced no $done_file"
  say "$name: done in $(( $(date +%s) - t0 )) s"
}

argo_crds() {
  local src tmp
  src=$(module_dir "$ARGO_MODULE@$ARGO_VERSION")
  tmp=$(mktemp -d "$CACHE/.crds.XXXXXX")
  cp "$src"/manifests/base/crds/full/argoproj.io_*.yaml "$tmp/"
  chmod -R u+w,go+rX "$tmp"
  mkdir -p "$ARGO_DIR"
  rm -rf "$ARGO_DIR/crds"
  mv "$tmp" "$ARGO_DIR/crds"
}

mkdir -p "$CACHE"
step "Argo $ARGO_VERSION full CRDs" "$ARGO_DIR/crds/argoproj.io_workflows.yaml" argo_crds
say "ready in $CACHE ($(( $(date +%s) - started )) s)"
