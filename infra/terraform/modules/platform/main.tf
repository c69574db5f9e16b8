# The platform batch-gateway runs on: namespaces, PostgreSQL (CloudNativePG), Valkey, a bucket (AWS S3 or MinIO) and
# Argo Workflows with its archive in the same PostgreSQL. Passwords are generated here and handed to the gateway
# module through sensitive outputs.

locals {
  postgres_name = "bg-postgres"
  postgres_host = "${local.postgres_name}-rw.${var.namespace}.svc.cluster.local"
  valkey_host   = "valkey.${var.namespace}.svc.cluster.local"
  minio_host    = "minio.${var.namespace}.svc.cluster.local"
}

resource "kubernetes_namespace_v1" "gateway" {
  metadata {
    name = var.namespace
    labels = {
      "app.kubernetes.io/part-of" = "batch-gateway"
    }
  }
}

resource "kubernetes_namespace_v1" "argo" {
  metadata {
    name = var.argo_namespace
  }
}

resource "random_password" "postgres" {
  length  = 32
  special = false # it goes into a URL
}

resource "random_password" "valkey" {
  length  = 32
  special = false
}

resource "random_password" "minio" {
  count   = var.object_store == "minio" ? 1 : 0
  length  = 32
  special = false
}

# --- PostgreSQL ----------------------------------------------------------------------------------

resource "kubernetes_secret_v1" "postgres_owner" {
  metadata {
    name      = "${local.postgres_name}-credentials"
    namespace = kubernetes_namespace_v1.gateway.metadata[0].name
  }
  type = "kubernetes.io/basic-auth"
  data = {
    username = "batch_gateway"
    password = random_password.postgres.result
  }
}

# Argo's controller reads its database credentials from its own namespace.
resource "kubernetes_secret_v1" "argo_postgres" {
  metadata {
    name      = "argo-postgres-config"
    namespace = kubernetes_namespace_v1.argo.metadata[0].name
  }
  data = {
    username = "batch_gateway"
    password = random_password.postgres.result
  }
}

resource "helm_release" "cnpg" {
  name             = "cnpg"
  repository       = "https://cloudnative-pg.github.io/charts"
  chart            = "cloudnative-pg"
  version          = var.cnpg_chart_version
  namespace        = "cnpg-system"
  create_namespace = true
  wait             = true
}

resource "helm_release" "postgres" {
  name       = local.postgres_name
  repository = "https://cloudnative-pg.github.io/charts"
  chart      = "cluster"
  namespace  = kubernetes_namespace_v1.gateway.metadata[0].name
  values = [yamlencode({
    fullnameOverride = local.postgres_name
    type             = "postgresql"
    mode             = "standalone"
    cluster = {
      instances = var.postgres_instances
      storage   = { size = var.postgres_storage_size }
      initdb = {
        database = "batch_gateway"
        owner    = "batch_gateway"
        secret   = { name = kubernetes_secret_v1.postgres_owner.metadata[0].name }
      }
    }
    backups = { enabled = false } # configure barman backups for anything you cannot lose
  })]
  depends_on = [helm_release.cnpg]
}

# --- Valkey --------------------------------------------------------------------------------------

resource "kubernetes_secret_v1" "valkey_users" {
  metadata {
    name      = "valkey-users"
    namespace = kubernetes_namespace_v1.gateway.metadata[0].name
  }
  data = {
    default = random_password.valkey.result
  }
}

resource "helm_release" "valkey" {
  name       = "valkey"
  repository = "https://valkey.io/valkey-helm/"
  chart      = "valkey"
  version    = var.valkey_chart_version
  namespace  = kubernetes_namespace_v1.gateway.metadata[0].name
  values = [yamlencode({
    fullnameOverride = "valkey"
    auth = {
      enabled             = true
      usersExistingSecret = kubernetes_secret_v1.valkey_users.metadata[0].name
      aclUsers            = { default = { permissions = "~* &* +@all" } }
    }
  })]
}

# --- object store --------------------------------------------------------------------------------

resource "aws_s3_bucket" "objects" {
  count  = var.object_store == "s3" ? 1 : 0
  bucket = var.bucket_name
}

resource "aws_s3_bucket_public_access_block" "objects" {
  count                   = var.object_store == "s3" ? 1 : 0
  bucket                  = aws_s3_bucket.objects[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# Uploads are multipart; a crashed upload must not leave parts behind forever.
resource "aws_s3_bucket_lifecycle_configuration" "objects" {
  count  = var.object_store == "s3" ? 1 : 0
  bucket = aws_s3_bucket.objects[0].id
  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

resource "kubernetes_secret_v1" "minio_root" {
  count = var.object_store == "minio" ? 1 : 0
  metadata {
    name      = "minio-root"
    namespace = kubernetes_namespace_v1.gateway.metadata[0].name
  }
  data = {
    rootUser     = "batch-gateway"
    rootPassword = random_password.minio[0].result
  }
}

resource "helm_release" "minio" {
  count      = var.object_store == "minio" ? 1 : 0
  name       = "minio"
  repository = "https://charts.min.io/"
  chart      = "minio"
  namespace  = kubernetes_namespace_v1.gateway.metadata[0].name
  values = [yamlencode({
    mode           = "standalone"
    replicas       = 1
    existingSecret = kubernetes_secret_v1.minio_root[0].metadata[0].name
    persistence    = { enabled = true, size = var.minio_storage_size }
    resources      = { requests = { memory = "512Mi" } }
    buckets        = [{ name = var.bucket_name, policy = "none", purge = false }]
    users          = []
  })]
}

# --- Argo Workflows ------------------------------------------------------------------------------

resource "helm_release" "argo_workflows" {
  name       = "argo-workflows"
  repository = "https://argoproj.github.io/argo-helm"
  chart      = "argo-workflows"
  version    = var.argo_workflows_chart_version
  namespace  = kubernetes_namespace_v1.argo.metadata[0].name
  values = [yamlencode({
    controller = {
      workflowNamespaces   = [var.namespace]
      workflowRestrictions = var.argo_template_referencing == "" ? {} : { templateReferencing = var.argo_template_referencing }
      persistence = {
        archive    = true
        archiveTTL = var.argo_archive_ttl
        postgresql = {
          host           = local.postgres_host
          port           = 5432
          database       = "batch_gateway"
          tableName      = "argo_workflows"
          userNameSecret = { name = kubernetes_secret_v1.argo_postgres.metadata[0].name, key = "username" }
          passwordSecret = { name = kubernetes_secret_v1.argo_postgres.metadata[0].name, key = "password" }
          ssl            = true
          sslMode        = "require"
        }
      }
    }
    server = {
      serviceType = var.argo_server_service_type
    }
    workflow = {
      serviceAccount = { create = false } # the gateway module brings its own ServiceAccounts and Roles
      rbac           = { create = false }
    }
  })]
  depends_on = [helm_release.postgres]
}
