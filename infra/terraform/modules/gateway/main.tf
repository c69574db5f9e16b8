# batch-gateway itself: its Secret, then every manifest of templates/ (API Deployment and Service, runner and gc
# WorkflowTemplates, gc CronWorkflow, ServiceAccounts, Roles, ConfigMaps) through the small local chart in ./chart.
#
# Why a chart and not kubernetes_manifest: kubernetes_manifest needs the WorkflowTemplate and CronWorkflow CRDs at plan
# time, before the platform module has installed Argo. helm_release resolves kinds only when it applies.
# The chart renders the files of templates/ as they are, setting only the namespace, image, replicas, Service type,
# semaphore size and ConfigMap values, so there is one source of truth for the manifests (kustomize reads the same).

locals {
  templates_dir = coalesce(var.templates_dir, "${path.module}/../../../../templates")
  # every object file that templates/kustomization.yaml lists, in its order
  manifest_files = yamldecode(file("${local.templates_dir}/kustomization.yaml")).resources
  config = merge(
    {
      BATCH_GATEWAY_UPSTREAM     = var.upstream
      BATCH_GATEWAY_OBJECT_STORE = var.object_store_url
      AWS_REGION                 = var.aws_region
    },
    var.s3_endpoint == null ? {} : {
      AWS_ENDPOINT_URL = var.s3_endpoint
      AWS_ALLOW_HTTP   = startswith(var.s3_endpoint, "http://") ? "true" : "false"
    },
    var.extra_config,
  )
  secrets = merge(
    {
      BATCH_GATEWAY_DATABASE_URL     = var.database_url
      BATCH_GATEWAY_VALKEY_URL       = var.valkey_url
      BATCH_GATEWAY_UPSTREAM_API_KEY = var.upstream_api_key
    },
    var.s3_access_key_id == null ? {} : {
      AWS_ACCESS_KEY_ID     = var.s3_access_key_id
      AWS_SECRET_ACCESS_KEY = var.s3_secret_access_key
    },
  )
}

resource "kubernetes_secret_v1" "gateway" {
  metadata {
    name      = "batch-gateway-secrets"
    namespace = var.namespace
    labels = {
      "app.kubernetes.io/name"    = "batch-gateway"
      "app.kubernetes.io/part-of" = "batch-gateway"
    }
  }
  data = local.secrets
}

resource "helm_release" "gateway" {
  name      = "batch-gateway"
  chart     = "${path.module}/chart"
  namespace = var.namespace
  wait      = true
  timeout   = 600
  values = [yamlencode({
    manifests       = [for f in local.manifest_files : file("${local.templates_dir}/${f}")]
    image           = var.image
    apiReplicas     = var.api_replicas
    runners         = var.max_concurrent_runners
    serviceType     = var.service_type
    config          = local.config
    bootstrapTenant = var.bootstrap_tenant
  })]
  # Restart the pods when a secret changes (envFrom is read at start).
  set = [{
    name  = "secretChecksum"
    value = sha256(jsonencode(local.secrets))
  }]
  depends_on = [kubernetes_secret_v1.gateway]
}
