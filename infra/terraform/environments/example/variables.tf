variable "kubeconfig" {
  description = "Path of the kubeconfig for the target cluster."
  type        = string
  default     = "~/.kube/config"
}

variable "kube_context" {
  description = "kubeconfig context of the target cluster (null: the current one)."
  type        = string
  default     = null
}

variable "namespace" {
  description = "Namespace of the gateway and its backends."
  type        = string
  default     = "batch-gateway"
}

variable "image" {
  description = "The batch-gateway image, pushed to a registry the cluster can pull from."
  type        = string
}

variable "object_store" {
  description = "\"s3\" (an AWS bucket) or \"minio\" (in-cluster)."
  type        = string
  default     = "minio"
}

variable "bucket_name" {
  description = "Bucket name (globally unique on AWS)."
  type        = string
  default     = "batch-gateway"
}

variable "aws_region" {
  description = "AWS region of the bucket."
  type        = string
  default     = "us-east-1"
}

variable "inference_mode" {
  description = "\"simulator\" (no GPU) or \"vllm\"."
  type        = string
  default     = "simulator"
}

variable "vllm_model_url" {
  description = "Model vLLM serves when inference_mode = \"vllm\"."
  type        = string
  default     = "Qwen/Qwen2.5-1.5B-Instruct"
}

variable "model_replicas" {
  description = "Model server pods."
  type        = number
  default     = 2
}

variable "max_concurrent_runners" {
  description = "Batches running at once."
  type        = number
  default     = 4
}
