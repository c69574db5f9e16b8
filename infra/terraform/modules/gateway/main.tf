# batch-gateway itself: its Secret, then the repository's Helm chart (charts/batch-gateway: API Deployment and Service,
# runner and gc WorkflowTemplates, gc CronWorkflow, ServiceAccounts, Roles, ConfigMaps, and the Job that creates the
# first API key).
#
# Why helm_release and not kubernetes_manifest: kubernetes_manifest needs the WorkflowTemplate and CronWorkflow CRDs
# at plan time, before the platform module has installed Argo. helm_release resolves kinds only when it applies.
# One source of truth: the chart renders what templates/ (the kustomize base) holds, and tests/infra/test_chart.py
# renders the kustomize base, the chart, and the chart with this module's values, and compares the objects.

locals {
  chart_dir   = coalesce(var.chart_dir, "${path.module}/../../../../charts/batch-gateway")
  secret_name = "batch-gateway-secrets"
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
  # The chart's values (charts/batch-gateway/values.yaml): variables only, so that the test can render them.
  values = {
    image = {
      repository = var.image
    }
    upstream = var.upstream
    objectStore = {
      url      = var.object_store_url
      region   = var.aws_region
      endpoint = var.s3_endpoint
    }
    limits = {
      completionWindowSeconds = var.completion_window_seconds
    }
    config = var.extra_config
    api = {
      replicas = var.api_replicas
      service = {
        type = var.service_type
      }
    }
    runner = {
      maxConcurrent = var.max_concurrent_runners
    }
    secret = {
      name = local.secret_name
      # Restart the pods when a secret changes (envFrom is read at start).
      checksum = sha256(jsonencode(local.secrets))
    }
    bootstrapKey = {
      tenant = var.bootstrap_tenant
    }
  }
}

resource "kubernetes_secret_v1" "gateway" {
  metadata {
    name      = local.secret_name
    namespace = var.namespace
    labels = {
      "app.kubernetes.io/name"    = "batch-gateway"
      "app.kubernetes.io/part-of" = "batch-gateway"
    }
  }
  data = local.secrets
}

resource "helm_release" "gateway" {
  name       = "batch-gateway"
  chart      = local.chart_dir
  namespace  = var.namespace
  wait       = true
  timeout    = 600
  values     = [yamlencode(local.values)]
  depends_on = [kubernetes_secret_v1.gateway]
}
