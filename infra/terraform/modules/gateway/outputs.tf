output "api_service" {
  description = "The API's in-cluster address (OpenAI base URL: append /v1)."
  value       = "http://batch-gateway-api.${var.namespace}.svc.cluster.local:8000"
}

output "runner_template" {
  description = "The WorkflowTemplate each batch's Workflow references (BATCH_GATEWAY_ARGO_TEMPLATE)."
  value       = "batch-gateway-runner"
}

output "bootstrap_key_command" {
  description = "Prints the API key created at install (then delete the Job)."
  value       = var.bootstrap_tenant == "" ? null : "kubectl logs -n ${var.namespace} job/batch-gateway-bootstrap-key | grep '^sk-bg-'"
}

output "release" {
  description = "The Helm release of the batch-gateway chart."
  value       = helm_release.gateway.name
}
