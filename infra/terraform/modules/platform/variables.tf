variable "namespace" {
  description = "Namespace of the gateway, its PostgreSQL, Valkey and (with MinIO) object store; Argo runs Workflows here."
  type        = string
  default     = "batch-gateway"
}

variable "argo_namespace" {
  description = "Namespace of the Argo Workflows controller and server."
  type        = string
  default     = "argo"
}

variable "argo_workflows_chart_version" {
  description = "Version of the argo/argo-workflows chart (1.x is Argo Workflows v4)."
  type        = string
  default     = "1.1.1"
}

variable "argo_template_referencing" {
  description = "Controller workflowRestrictions.templateReferencing: Strict (only Workflows from a WorkflowTemplate), Secure, or empty for none."
  type        = string
  default     = "Strict"
}

variable "argo_server_service_type" {
  description = "Service type of the Argo UI/API server (ClusterIP: reach it with kubectl port-forward or an Ingress)."
  type        = string
  default     = "ClusterIP"
}

variable "argo_archive_ttl" {
  description = "How long the workflow archive keeps finished runs (the Argo UI's history)."
  type        = string
  default     = "30d"
}

variable "cnpg_chart_version" {
  description = "Version of the cnpg/cloudnative-pg operator chart; null for the latest."
  type        = string
  default     = null
}

variable "postgres_instances" {
  description = "PostgreSQL instances in the CloudNativePG cluster (3 for high availability)."
  type        = number
  default     = 1
}

variable "postgres_storage_size" {
  description = "Volume size of each PostgreSQL instance."
  type        = string
  default     = "10Gi"
}

variable "valkey_chart_version" {
  description = "Version of the valkey/valkey chart; null for the latest."
  type        = string
  default     = null
}

variable "object_store" {
  description = "Where file bytes live: \"s3\" (an AWS S3 bucket created here) or \"minio\" (a MinIO release in the namespace, for clusters without S3)."
  type        = string
  default     = "minio"
  validation {
    condition     = contains(["s3", "minio"], var.object_store)
    error_message = "object_store must be \"s3\" or \"minio\"."
  }
}

variable "bucket_name" {
  description = "The bucket (S3 bucket names are global: pick a unique one)."
  type        = string
  default     = "batch-gateway"
}

variable "aws_region" {
  description = "Region of the S3 bucket (the gateway's AWS_REGION)."
  type        = string
  default     = "us-east-1"
}

variable "minio_storage_size" {
  description = "Volume size of MinIO (object_store = \"minio\")."
  type        = string
  default     = "20Gi"
}
