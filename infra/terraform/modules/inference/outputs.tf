output "model_name" {
  description = "The model name batches use."
  value       = local.model_name
}

output "service" {
  description = "The Service in front of the model server pods."
  value       = local.service
}

output "upstream" {
  description = "The gateway's BATCH_GATEWAY_UPSTREAM entry: MODEL=k8s://NAMESPACE/SERVICE:PORT_NAME."
  value       = "${local.model_name}=k8s://${var.namespace}/${local.service}:${local.port_name}"
}
