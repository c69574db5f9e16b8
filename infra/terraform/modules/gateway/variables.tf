variable "namespace" {
  description = "Namespace of the API, the runner Workflows and gc (Argo must watch it)."
  type        = string
}

variable "image" {
  description = "The batch-gateway image (built from the repository's Containerfile), e.g. ghcr.io/you/batch-gateway:0.1.0."
  type        = string
}

variable "chart_dir" {
  description = "The batch-gateway Helm chart to install (default: the repository's charts/batch-gateway)."
  type        = string
  default     = null
}

variable "api_replicas" {
  description = "Replicas of the API Deployment."
  type        = number
  default     = 2
}

variable "max_concurrent_runners" {
  description = "Batches running at once (the runner WorkflowTemplate's semaphore); the others wait, Pending."
  type        = number
  default     = 4
}

variable "service_type" {
  description = "Type of the API Service (ClusterIP behind an Ingress or Gateway; LoadBalancer to expose it directly)."
  type        = string
  default     = "ClusterIP"
}

variable "upstream" {
  description = "BATCH_GATEWAY_UPSTREAM: where batches run (URL, MODEL=URL, MODEL=k8s://NAMESPACE/SERVICE:PORT; space-separated for several)."
  type        = string
}

variable "object_store_url" {
  description = "BATCH_GATEWAY_OBJECT_STORE: s3://bucket/prefix."
  type        = string
}

variable "aws_region" {
  description = "AWS_REGION of the bucket."
  type        = string
  default     = "us-east-1"
}

variable "s3_endpoint" {
  description = "AWS_ENDPOINT_URL for an S3-compatible server (MinIO); null for AWS S3."
  type        = string
  default     = null
}

variable "s3_access_key_id" {
  description = "S3 access key; null when the pods get credentials another way (IRSA, EKS Pod Identity)."
  type        = string
  default     = null
  sensitive   = true
}

variable "s3_secret_access_key" {
  description = "S3 secret key; null with IRSA or Pod Identity."
  type        = string
  default     = null
  sensitive   = true
}

variable "database_url" {
  description = "BATCH_GATEWAY_DATABASE_URL (postgresql://...)."
  type        = string
  sensitive   = true
}

variable "valkey_url" {
  description = "BATCH_GATEWAY_VALKEY_URL; empty to run on the database alone."
  type        = string
  default     = ""
  sensitive   = true
}

variable "upstream_api_key" {
  description = "Bearer token the runners send to the model servers (the gateway's own, never a user's)."
  type        = string
  default     = ""
  sensitive   = true
}

variable "completion_window_seconds" {
  description = "Seconds a batch may run before it expires; the runner Workflow's deadline follows (plus two hours)."
  type        = number
  default     = 86400
}

variable "extra_config" {
  description = "More BATCH_GATEWAY_* settings for the ConfigMap (see `batch-gateway config-reference`), e.g. { BATCH_GATEWAY_COMPLETION_WINDOW_SECONDS = \"172800\" }."
  type        = map(string)
  default     = {}
}

variable "bootstrap_tenant" {
  description = "Tenant of an API key created once at install by a Job (`kubectl logs -n NAMESPACE job/batch-gateway-bootstrap-key`); empty for none. The API only starts once a key exists."
  type        = string
  default     = "admin"
}
