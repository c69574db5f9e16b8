# An example environment: platform, inference pool and gateway on one cluster.
#
#   terraform init
#   terraform apply -var image=ghcr.io/you/batch-gateway:0.1.0
#
# See ../../README.md for what each module creates and how to reach the API and the Argo UI afterwards.

module "platform" {
  source = "../../modules/platform"

  namespace    = var.namespace
  object_store = var.object_store
  bucket_name  = var.bucket_name
  aws_region   = var.aws_region
}

module "inference" {
  source = "../../modules/inference"

  namespace      = module.platform.namespace
  mode           = var.inference_mode
  vllm_model_url = var.vllm_model_url
  replicas       = var.model_replicas
}

module "gateway" {
  source = "../../modules/gateway"

  namespace              = module.platform.namespace
  image                  = var.image
  upstream               = module.inference.upstream
  max_concurrent_runners = var.max_concurrent_runners
  database_url           = module.platform.database_url
  valkey_url             = module.platform.valkey_url
  object_store_url       = module.platform.object_store_url
  aws_region             = module.platform.aws_region
  s3_endpoint            = module.platform.s3_endpoint
  s3_access_key_id       = module.platform.s3_access_key_id
  s3_secret_access_key   = module.platform.s3_secret_access_key

  # The gateway's pods need the database, Valkey, the bucket and Argo's CRDs before they start.
  depends_on = [module.platform]
}
