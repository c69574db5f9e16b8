#!/usr/bin/env bash
# The command-line tools the chart and alert tests run, built from the Go module proxy at the versions pinned in
# scripts/tools-versions.env:
#   - helm (helm.sh/helm/v4/cmd/helm): `helm lint` and `helm template` of charts/batch-gateway;
#   - promtool (github.com/prometheus/prometheus/cmd/promtool): `promtool check rules` and `promtool test rules` of
#     the chart's alerts;
#   - kubectl (`kubectl kustomize templates/`), by scripts/install-control-plane.sh kubectl.
# Binaries go to a cache folder outside the repository (BATCH_GATEWAY_TOOLS_CACHE, default
# ~/.cache/batch-gateway/tools/), one sub-folder per tool and version: a second run takes well under a second. The
# first build, modules downloaded included, took 98 s for helm and 74 s for promtool on the 2-core test machine
# (82 MB and 52 MB; promtool with all of Prometheus's service discoveries took 284-617 s).
# Needs Go (go1.26 or newer) and the Go module proxy; nothing else is downloaded. Builds run at the caller's
# niceness (`nice -n 19 scripts/install-tools.sh` on a shared machine); BUILD_JOBS sets go's -p (default: the cores).
#   scripts/install-tools.sh              all of them
#   scripts/install-tools.sh helm         one (helm, promtool or kubectl)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tools-versions.env
source scripts/tools-versions.env

CACHE="${BATCH_GATEWAY_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/batch-gateway/tools}"
say() { echo "==> tools: $*"; }
fail() { echo -e "ERROR: install-tools: $*" >&2; exit 1; }

# build NAME VERSION PACKAGE@VERSION [LDFLAGS [TAGS]]: `go install` into CACHE/NAME-VERSION/, unless it is there
# already.
build() {
  local name=$1 version=$2 package=$3 ldflags=${4:-} tags=${5:-} dir t0
  dir="$CACHE/$name-$version"
  if [ -x "$dir/$name" ]; then
    say "$name $version: cached ($dir/$name)"
    return
  fi
  command -v go >/dev/null || fail "building $name needs Go (go1.26 or newer) on the PATH, with the Go module proxy"
  t0=$(date +%s)
  say "$name $version: building $package from the Go module proxy (the first time takes minutes)..."
  mkdir -p "$dir"
  rm -rf "$dir/.bin"
  GOBIN="$dir/.bin" GOFLAGS=-mod=mod go install -p "${BUILD_JOBS:-$(nproc)}" -trimpath -buildvcs=false \
    -tags "$tags" -ldflags "-s -w $ldflags" "$package"
  mv "$dir/.bin/$name" "$dir/$name"
  rm -rf "$dir/.bin"
  "$dir/$name" --version >/dev/null 2>&1 || "$dir/$name" version >/dev/null 2>&1 || fail "$dir/$name does not run"
  say "$name $version: built in $(( $(date +%s) - t0 )) s ($(du -h "$dir/$name" | cut -f1)): $dir/$name"
}

install_helm() {
  build helm "$HELM_VERSION" "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" \
    "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
}

# Without the service discoveries of the clouds (remove_all_sd: Prometheus's own build tag, plugins/plugin_*.go):
# `check rules` and `test rules` need none of them, and the clouds' SDKs were most of the build.
install_promtool() {
  build promtool "$PROMTOOL_VERSION" "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_VERSION" \
    "-X github.com/prometheus/common/version.Version=$PROMTOOL_VERSION" remove_all_sd
}

install_kubectl() {  # built with the test control plane's Kubernetes module, at the same pinned version
  scripts/install-control-plane.sh kubectl
}

case "${1:-all}" in
  all) install_kubectl; install_helm; install_promtool ;;
  helm | promtool | kubectl) "install_$1" ;;
  *) fail "unknown tool '$1' (helm, promtool, kubectl or all)" ;;
esac
