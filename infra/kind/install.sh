#!/usr/bin/env bash
# A GPU-less batch-gateway on a local kind cluster, with Helm: Argo Workflows (archive on PostgreSQL), PostgreSQL
# (CloudNativePG), Valkey, MinIO, two llm-d-inference-sim replicas as the model pool, and the gateway built from this
# checkout. Safe to run again: it reuses the cluster, the passwords and the API key it made before.
#
#   infra/kind/install.sh            # then follow infra/kind/README.md
#
# Needs docker, kind (>= 0.20), kubectl and helm (>= 3.12). Environment overrides:
#   CLUSTER_NAME (batch-gateway)  IMAGE (batch-gateway:dev)  SKIP_BUILD=1 (reuse the image)
#   ARGO_CHART_VERSION (1.1.1)    HELM_TIMEOUT (10m)
set -euo pipefail

CLUSTER_NAME="${CLUSTER_NAME:-batch-gateway}"
IMAGE="${IMAGE:-batch-gateway:dev}"
ARGO_CHART_VERSION="${ARGO_CHART_VERSION:-1.1.1}"
HELM_TIMEOUT="${HELM_TIMEOUT:-10m}"
NAMESPACE="batch-gateway"
ARGO_NAMESPACE="argo"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
info() { printf '    %s\n' "$*"; }
fail() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is not installed (see infra/kind/README.md, Prerequisites)"
done
docker info >/dev/null 2>&1 || fail "docker is installed but its daemon does not answer (is Docker running?)"

# A random password, or the one a previous run stored in the Secret (so re-running keeps the databases usable).
secret_value() {  # namespace secret key
  kubectl get secret "$2" -n "$1" -o "jsonpath={.data.$3}" 2>/dev/null | base64 -d 2>/dev/null || true
}
random_password() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
apply_secret() {  # namespace name [--type=...] --from-literal=... ...
  local ns="$1" name="$2"
  shift 2
  kubectl create secret generic "$name" -n "$ns" "$@" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
}

step "kind cluster '$CLUSTER_NAME'"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  info "exists; reusing it"
else
  kind create cluster --name "$CLUSTER_NAME" --config "$HERE/cluster.yaml" --wait 120s
fi
kubectl config use-context "kind-$CLUSTER_NAME" >/dev/null

step "gateway image $IMAGE"
if [[ "${SKIP_BUILD:-0}" == "1" ]]; then
  info "SKIP_BUILD=1: using the existing image"
else
  docker build -f "$REPO/Containerfile" -t "$IMAGE" "$REPO"
fi
kind load docker-image "$IMAGE" --name "$CLUSTER_NAME"

step "namespaces and secrets"
for ns in "$NAMESPACE" "$ARGO_NAMESPACE"; do
  kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
done
PG_PASSWORD="$(secret_value "$NAMESPACE" bg-postgres-credentials password)"
PG_PASSWORD="${PG_PASSWORD:-$(random_password)}"
MINIO_PASSWORD="$(secret_value "$NAMESPACE" minio-root rootPassword)"
MINIO_PASSWORD="${MINIO_PASSWORD:-$(random_password)}"
apply_secret "$NAMESPACE" bg-postgres-credentials --type=kubernetes.io/basic-auth \
  --from-literal=username=batch_gateway --from-literal=password="$PG_PASSWORD"
apply_secret "$ARGO_NAMESPACE" argo-postgres-config \
  --from-literal=username=batch_gateway --from-literal=password="$PG_PASSWORD"
apply_secret "$NAMESPACE" minio-root --from-literal=rootUser=batch-gateway --from-literal=rootPassword="$MINIO_PASSWORD"
apply_secret "$NAMESPACE" batch-gateway-secrets \
  --from-literal=BATCH_GATEWAY_DATABASE_URL="postgresql://batch_gateway:${PG_PASSWORD}@bg-postgres-rw:5432/batch_gateway?sslmode=require" \
  --from-literal=BATCH_GATEWAY_VALKEY_URL="redis://valkey:6379/0" \
  --from-literal=AWS_ACCESS_KEY_ID=batch-gateway \
  --from-literal=AWS_SECRET_ACCESS_KEY="$MINIO_PASSWORD"
info "passwords are in the Secrets bg-postgres-credentials and minio-root (namespace $NAMESPACE)"

step "Helm repositories"
helm repo add argo https://argoproj.github.io/argo-helm --force-update >/dev/null
helm repo add cnpg https://cloudnative-pg.github.io/charts --force-update >/dev/null
helm repo add valkey https://valkey.io/valkey-helm/ --force-update >/dev/null
helm repo add minio https://charts.min.io/ --force-update >/dev/null
helm repo update >/dev/null

step "PostgreSQL (CloudNativePG operator, then a one-instance cluster)"
helm upgrade --install cnpg cnpg/cloudnative-pg --namespace cnpg-system --create-namespace --wait --timeout "$HELM_TIMEOUT"
helm upgrade --install bg-postgres cnpg/cluster --namespace "$NAMESPACE" -f "$HERE/values/postgres.yaml" --wait --timeout "$HELM_TIMEOUT"
info "waiting for cluster bg-postgres to be ready (first start pulls the PostgreSQL image)"
until kubectl get cluster.postgresql.cnpg.io/bg-postgres -n "$NAMESPACE" >/dev/null 2>&1; do sleep 2; done
kubectl wait --for=condition=Ready cluster.postgresql.cnpg.io/bg-postgres -n "$NAMESPACE" --timeout=10m

step "Valkey"
helm upgrade --install valkey valkey/valkey --namespace "$NAMESPACE" -f "$HERE/values/valkey.yaml" --wait --timeout "$HELM_TIMEOUT"

step "MinIO (the S3 server) with bucket batch-gateway"
helm upgrade --install minio minio/minio --namespace "$NAMESPACE" -f "$HERE/values/minio.yaml" --wait --timeout "$HELM_TIMEOUT"

step "Argo Workflows $ARGO_CHART_VERSION (chart), archive on PostgreSQL"
helm upgrade --install argo-workflows argo/argo-workflows --namespace "$ARGO_NAMESPACE" --version "$ARGO_CHART_VERSION" \
  -f "$HERE/values/argo-workflows.yaml" --wait --timeout "$HELM_TIMEOUT"
kubectl wait --for=condition=Established crd/workflowtemplates.argoproj.io crd/cronworkflows.argoproj.io --timeout=2m

step "gateway, templates and the simulator pool (kubectl apply -k infra/kind/gateway)"
kubectl apply -k "$HERE/gateway"
kubectl rollout status deployment/llm-d-sim -n "$NAMESPACE" --timeout=5m

step "API key for tenant 'demo'"
API_KEY="$(secret_value "$NAMESPACE" batch-gateway-demo-key key)"
if [[ -n "$API_KEY" ]]; then
  info "reusing the key stored in Secret batch-gateway-demo-key"
else
  kubectl delete job batch-gateway-demo-key -n "$NAMESPACE" --ignore-not-found >/dev/null
  kubectl apply -k "$HERE/bootstrap" >/dev/null
  kubectl wait --for=condition=Complete job/batch-gateway-demo-key -n "$NAMESPACE" --timeout=5m \
    || fail "the key Job did not complete: kubectl logs -n $NAMESPACE job/batch-gateway-demo-key"
  API_KEY="$(kubectl logs -n "$NAMESPACE" job/batch-gateway-demo-key | grep -E '^sk-bg-' | tail -n 1 || true)"
  [[ -n "$API_KEY" ]] || fail "no key in the Job's log: kubectl logs -n $NAMESPACE job/batch-gateway-demo-key"
  apply_secret "$NAMESPACE" batch-gateway-demo-key --from-literal=key="$API_KEY"
  kubectl delete job batch-gateway-demo-key -n "$NAMESPACE" >/dev/null
fi
printf '%s\n' "$API_KEY" > "$HERE/.api-key"
chmod 600 "$HERE/.api-key"

step "API rollout"
kubectl rollout status deployment/batch-gateway-api -n "$NAMESPACE" --timeout=5m

step "done"
cat <<EOF

  API (OpenAI-compatible):  http://localhost:8000/v1
  API key (tenant demo):    $API_KEY   (also in $HERE/.api-key)
  Argo UI (run history):    http://localhost:2746/workflows/$NAMESPACE

  Try it:
    export OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=\$(cat $HERE/.api-key)
    python infra/kind/demo.py        # or follow infra/kind/README.md

  Each batch runs as Workflow bg-<batch id hex> in namespace $NAMESPACE:
    kubectl get workflows -n $NAMESPACE
  Remove everything: kind delete cluster --name $CLUSTER_NAME
EOF
