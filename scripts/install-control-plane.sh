#!/usr/bin/env bash
# The test control plane (tests/control_plane/), built from the Go module proxy at the versions pinned in
# scripts/control-plane-versions.env:
#   - Argo Workflows' full CRDs (manifests/base/crds/full/ of the Argo module), which the manifest, executor and
#     control-plane tests use;
#   - etcd, kube-apiserver and kube-controller-manager;
#   - Argo's workflow-controller and argo (server and CLI);
#   - kubectl, from the same Kubernetes module (the tests use this build, whatever else is on the PATH).
# Everything goes to a cache folder outside the repository (BATCH_GATEWAY_CONTROL_PLANE_CACHE, default
# ~/.cache/batch-gateway/control-plane/), one sub-folder per pinned version: a second run takes a second or two.
# The first build takes about 25 minutes on 2 cores (docs/kubernetes.md has the measured times and sizes).
# Needs Go (go1.26 or newer) and the Go module proxy; nothing else is downloaded. Builds run at the caller's niceness;
# BUILD_JOBS sets go build's -p (default: the number of cores).
#   scripts/install-control-plane.sh          everything
#   scripts/install-control-plane.sh crds     only Argo's CRDs
#   scripts/install-control-plane.sh kubectl  Argo's CRDs and kubectl (what the tests without a control plane need)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=control-plane-versions.env
source scripts/control-plane-versions.env

CACHE="${BATCH_GATEWAY_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/batch-gateway/control-plane}"
ARGO_DIR="$CACHE/argo-$ARGO_VERSION"
KUBE_DIR="$CACHE/kubernetes-$KUBERNETES_VERSION"
ETCD_DIR="$CACHE/etcd-$ETCD_VERSION"
ARGO_MODULE=github.com/argoproj/argo-workflows/v4
WHAT="${1:-all}"

started=$(date +%s)
say() { echo "==> control plane: $*"; }
fail() { echo -e "ERROR: install-control-plane: $*" >&2; exit 1; }

command -v go >/dev/null || fail "needs Go (go1.26 or newer) on the PATH, with the Go module proxy reachable"
GO_BUILD=(go build -p "${BUILD_JOBS:-$(nproc)}" -trimpath -buildvcs=false)

# module_dir MODULE@VERSION: download a module through the Go module proxy (cached by Go) and print its folder.
module_dir() {
  local json dir
  json=$(cd "$CACHE" && GOFLAGS=-mod=mod go mod download -json "$1") || fail "go mod download $1 failed:\n$json"
  dir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")
  [ -d "$dir" ] || fail "go mod download $1 gave no folder:\n$json"
  echo "$dir"
}

# step NAME DONE_FILE FUNCTION: run FUNCTION unless DONE_FILE exists; say how long it took and how big it is.
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
  say "$name: done in $(( $(date +%s) - t0 )) s ($(du -sh "$done_file" | cut -f1))"
}

# --- Argo: CRDs, workflow-controller, argo -------------------------------------------------------------------------

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

# A writable copy of the module source, with two changes for tests:
#   - `argo` embeds the UI from ui/dist/app, which the module does not ship (it is built with npm); a placeholder page
#     stands in, as in Argo's own CLI-only builds. The tests use the server's API, not the UI.
#   - The server, the controller's health endpoint and the metrics exporter listen on every interface (":PORT") with
#     no flag to change it; the test build listens on 127.0.0.1 only.
argo_source() {
  local src
  [ -f "$ARGO_DIR/src/.patched" ] && return
  src=$(module_dir "$ARGO_MODULE@$ARGO_VERSION")
  rm -rf "$ARGO_DIR/src"
  mkdir -p "$ARGO_DIR"
  cp -r "$src" "$ARGO_DIR/src"
  chmod -R u+w "$ARGO_DIR/src"
  mkdir -p "$ARGO_DIR/src/ui/dist/app"
  echo "<html><body>Argo UI not built (batch-gateway test control plane)</body></html>" >"$ARGO_DIR/src/ui/dist/app/index.html"
  loopback "$ARGO_DIR/src/server/apiserver/argoserver.go" 'address := fmt.Sprintf(":%d", port)'
  loopback "$ARGO_DIR/src/cmd/workflow-controller/main.go" 'http.ListenAndServe(":6060", nil)'
  loopback "$ARGO_DIR/src/util/telemetry/exporter_prometheus.go" 'Addr: fmt.Sprintf(":%v", m.config.port())'
  touch "$ARGO_DIR/src/.patched"
}

# loopback FILE CODE: in CODE's first string literal, listen on 127.0.0.1 (`":` becomes `"127.0.0.1:`).
loopback() {
  local file=$1 code=$2 patched
  grep -qF "$code" "$file" || fail "cannot make $file listen on loopback: '$code' not found (a new Argo version?)"
  patched=${code/\":/\"127.0.0.1:}
  sed -i "s|$(sed 's/[][\.*^$|]/\\&/g' <<<"$code")|$(sed 's/[\&|]/\\&/g' <<<"$patched")|" "$file"
  grep -qF "$patched" "$file" || fail "patching $file failed"
}

argo_build() {  # argo_build COMMAND
  argo_source
  local ldflags="-s -w -X $ARGO_MODULE.version=$ARGO_VERSION -X $ARGO_MODULE.gitTag=$ARGO_VERSION"
  (cd "$ARGO_DIR/src" && GOFLAGS=-mod=mod "${GO_BUILD[@]}" -ldflags "$ldflags" -o "$ARGO_DIR/bin/$1.tmp" "./cmd/$1")
  mv "$ARGO_DIR/bin/$1.tmp" "$ARGO_DIR/bin/$1"
}
argo_controller() { argo_build workflow-controller; }
argo_cli() { argo_build argo; }

# --- Kubernetes: a module of our own requiring k8s.io/kubernetes ---------------------------------------------------

# k8s.io/kubernetes replaces its staging modules (k8s.io/api, client-go, ...) with ./staging/src/..., folders a
# dependency does not have: pin each to the matching v0.x release instead (v1.37.2 -> v0.37.2).
kube_module() {
  local gomod staging
  mkdir -p "$KUBE_DIR/src"
  gomod=$(cd "$CACHE" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  staging=$(sed -n 's|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => \./staging/src/.*|\1|p' "$gomod")
  [ -n "$staging" ] || fail "no staging replace lines in $gomod"
  {
    echo "// Generated by scripts/install-control-plane.sh: builds kube-apiserver, kube-controller-manager and kubectl."
    echo "module batch-gateway.invalid/control-plane/kubernetes"
    echo
    echo "go $(sed -n 's/^go //p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    echo "replace ("
    for module in $staging; do echo "	$module => $module v0${KUBERNETES_VERSION#v1}"; done
    echo ")"
  } >"$KUBE_DIR/src/go.mod"
}

kube_build() {  # kube_build COMMAND
  [ -f "$KUBE_DIR/src/go.mod" ] || kube_module
  (cd "$KUBE_DIR/src" && GOFLAGS=-mod=mod go get "k8s.io/kubernetes/cmd/$1@$KUBERNETES_VERSION")
  local v=$KUBERNETES_VERSION minor ldflags=(-s -w)
  minor=$(cut -d. -f2 <<<"$v")
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=(-X "$pkg.gitVersion=$v" -X "$pkg.gitMajor=1" -X "$pkg.gitMinor=$minor" -X "$pkg.gitTreeState=clean")
  done
  (cd "$KUBE_DIR/src" && "${GO_BUILD[@]}" -ldflags "${ldflags[*]}" -o "$KUBE_DIR/bin/$1.tmp" "k8s.io/kubernetes/cmd/$1")
  mv "$KUBE_DIR/bin/$1.tmp" "$KUBE_DIR/bin/$1"
}
kube_apiserver() { kube_build kube-apiserver; }
kube_controller_manager() { kube_build kube-controller-manager; }
kubectl_build() { kube_build kubectl; }

# --- etcd: its server module is also its main package --------------------------------------------------------------

etcd_build() {
  mkdir -p "$ETCD_DIR/src"
  cat >"$ETCD_DIR/src/go.mod" <<EOF
// Generated by scripts/install-control-plane.sh: builds etcd.
module batch-gateway.invalid/control-plane/etcd

go 1.26.0
EOF
  (cd "$ETCD_DIR/src" && GOFLAGS=-mod=mod go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" &&
    "${GO_BUILD[@]}" -ldflags "-s -w" -o "$ETCD_DIR/bin/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$ETCD_DIR/bin/etcd.tmp" "$ETCD_DIR/bin/etcd"
}

mkdir -p "$CACHE"
step "Argo $ARGO_VERSION full CRDs" "$ARGO_DIR/crds/argoproj.io_workflows.yaml" argo_crds
if [ "$WHAT" = crds ]; then
  exit 0
fi
step "kubectl $KUBERNETES_VERSION" "$KUBE_DIR/bin/kubectl" kubectl_build
if [ "$WHAT" = kubectl ]; then
  exit 0
fi
[ "$WHAT" = all ] || fail "unknown argument $WHAT (expected nothing, crds or kubectl)"
step "etcd $ETCD_VERSION" "$ETCD_DIR/bin/etcd" etcd_build
step "kube-apiserver $KUBERNETES_VERSION" "$KUBE_DIR/bin/kube-apiserver" kube_apiserver
step "kube-controller-manager $KUBERNETES_VERSION" "$KUBE_DIR/bin/kube-controller-manager" kube_controller_manager
step "Argo $ARGO_VERSION workflow-controller" "$ARGO_DIR/bin/workflow-controller" argo_controller
step "Argo $ARGO_VERSION argo (server and CLI)" "$ARGO_DIR/bin/argo" argo_cli
say "ready in $CACHE ($(( $(date +%s) - started )) s)"
