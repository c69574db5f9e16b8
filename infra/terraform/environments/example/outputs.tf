output "api_url" {
  description = "In-cluster OpenAI base URL (kubectl port-forward -n NAMESPACE svc/batch-gateway-api 8000 for http://localhost:8000/v1)."
  value       = "${module.gateway.api_service}/v1"
}

output "bootstrap_key_command" {
  description = "Prints the first API key."
  value       = module.gateway.bootstrap_key_command
}

output "argo_ui" {
  description = "How to open the Argo UI."
  value       = "kubectl port-forward -n ${module.platform.argo_namespace} svc/argo-workflows-server 2746, then http://localhost:2746/workflows/${module.platform.namespace}"
}

output "model_name" {
  description = "The model name to use in batch requests."
  value       = module.inference.model_name
}
