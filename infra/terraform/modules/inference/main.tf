# The model servers batches run on: llm-d-inference-sim pods (a GPU-less stand-in with vLLM's API and metrics) or
# vLLM from its production-stack chart. Either way the gateway talks to each pod directly (k8s:// upstream), so it
# can balance and keep prefix-cache affinity itself.

locals {
  model_name  = var.model_name != "" ? var.model_name : (var.mode == "vllm" ? var.vllm_model_url : "sim-model")
  vllm_name   = "engine" # the chart's modelSpec name: Service vllm-engine-engine-service
  service     = var.mode == "vllm" ? "vllm-${local.vllm_name}-engine-service" : kubernetes_service_v1.simulator[0].metadata[0].name
  port_name   = var.mode == "vllm" ? "service-port" : "http"
  sim_labels  = { "app.kubernetes.io/name" = "llm-d-sim", "app.kubernetes.io/part-of" = "batch-gateway" }
  sim_enabled = var.mode == "simulator" ? 1 : 0
}

resource "kubernetes_deployment_v1" "simulator" {
  count = local.sim_enabled
  metadata {
    name      = "llm-d-sim"
    namespace = var.namespace
    labels    = local.sim_labels
  }
  spec {
    replicas = var.replicas
    selector {
      match_labels = { "app.kubernetes.io/name" = "llm-d-sim" }
    }
    template {
      metadata {
        labels = local.sim_labels
      }
      spec {
        container {
          name  = "sim"
          image = var.simulator_image
          args  = ["--model", local.model_name, "--port", "8000", "--mode", "random", "--time-to-first-token", "200", "--inter-token-latency", "30"]
          port {
            name           = "http"
            container_port = 8000
          }
          readiness_probe {
            tcp_socket {
              port = "http"
            }
            period_seconds = 5
          }
          resources {
            requests = { cpu = "50m", memory = "64Mi" }
            limits   = { memory = "256Mi" }
          }
          security_context {
            allow_privilege_escalation = false
            capabilities {
              drop = ["ALL"]
            }
          }
        }
      }
    }
  }
}

resource "kubernetes_service_v1" "simulator" {
  count = local.sim_enabled
  metadata {
    name      = "llm-d-sim"
    namespace = var.namespace
    labels    = local.sim_labels
  }
  spec {
    selector = { "app.kubernetes.io/name" = "llm-d-sim" }
    port {
      name        = "http"
      port        = 8000
      target_port = "http"
    }
  }
}

resource "helm_release" "vllm" {
  count      = var.mode == "vllm" ? 1 : 0
  name       = "vllm"
  repository = "https://vllm-project.github.io/production-stack"
  chart      = "vllm-stack"
  version    = var.vllm_chart_version
  namespace  = var.namespace
  timeout    = 1800 # the first start downloads the model
  values = [yamlencode({
    servingEngineSpec = {
      modelSpec = [{
        name          = local.vllm_name
        repository    = "vllm/vllm-openai"
        tag           = var.vllm_image_tag
        modelURL      = var.vllm_model_url
        replicaCount  = var.replicas
        requestCPU    = var.vllm_resources.cpu
        requestMemory = var.vllm_resources.memory
        requestGPU    = var.vllm_resources.gpu
        pvcStorage    = var.vllm_resources.pvc_size
        vllmConfig    = { extraArgs = var.vllm_resources.extra_args }
      }]
    }
  })]
}
