output "namespace" {
  description = "Namespace for the gateway and the inference pool."
  value       = kubernetes_namespace_v1.gateway.metadata[0].name
}

output "argo_namespace" {
  description = "Namespace of the Argo Workflows controller and server (UI: Service argo-workflows-server, port 2746)."
  value       = helm_release.argo_workflows.namespace
}

output "database_url" {
  description = "PostgreSQL URL for the gateway (BATCH_GATEWAY_DATABASE_URL)."
  value       = "postgresql://batch_gateway:${random_password.postgres.result}@${local.postgres_host}:5432/batch_gateway?sslmode=require"
  sensitive   = true
}

output "valkey_url" {
  description = "Valkey URL for the gateway (BATCH_GATEWAY_VALKEY_URL)."
  value       = "redis://default:${random_password.valkey.result}@${local.valkey_host}:6379/0"
  sensitive   = true
}

output "object_store_url" {
  description = "The gateway's BATCH_GATEWAY_OBJECT_STORE."
  value       = "s3://${var.bucket_name}/objects"
}

output "s3_endpoint" {
  description = "AWS_ENDPOINT_URL for MinIO; null for AWS S3."
  value       = var.object_store == "minio" ? "http://${local.minio_host}:9000" : null
}

output "aws_region" {
  description = "The gateway's AWS_REGION."
  value       = var.aws_region
}

output "s3_access_key_id" {
  description = "MinIO access key; null for AWS S3 (give the gateway's ServiceAccounts an IAM role, or pass keys to the gateway module)."
  value       = var.object_store == "minio" ? "batch-gateway" : null
  sensitive   = true
}

output "s3_secret_access_key" {
  description = "MinIO secret key; null for AWS S3."
  value       = var.object_store == "minio" ? random_password.minio[0].result : null
  sensitive   = true
}
