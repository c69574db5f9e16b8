variable "namespace" {
  description = "Namespace of the model servers (the gateway's runners reach their pods through EndpointSlices)."
  type        = string
}

variable "mode" {
  description = "\"simulator\": llm-d-inference-sim pods (no GPU); \"vllm\": vLLM through the vllm/vllm-stack chart."
  type        = string
  default     = "simulator"
  validation {
    condition     = contains(["simulator", "vllm"], var.mode)
    error_message = "mode must be \"simulator\" or \"vllm\"."
  }
}

variable "model_name" {
  description = "The model name batches use (the `model` of each request). Empty: sim-model for the simulator, vllm_model_url for vLLM (vLLM serves the model under that name)."
  type        = string
  default     = ""
}

variable "replicas" {
  description = "Model server pods."
  type        = number
  default     = 2
}

variable "simulator_image" {
  description = "The llm-d-inference-sim image."
  type        = string
  default     = "ghcr.io/llm-d/llm-d-inference-sim:v0.3.0"
}

variable "vllm_chart_version" {
  description = "Version of the vllm/vllm-stack chart; null for the latest."
  type        = string
  default     = null
}

variable "vllm_model_url" {
  description = "The Hugging Face model vLLM loads (mode = \"vllm\")."
  type        = string
  default     = "Qwen/Qwen2.5-1.5B-Instruct"
}

variable "vllm_image_tag" {
  description = "Tag of the vllm/vllm-openai image."
  type        = string
  default     = "latest"
}

variable "vllm_resources" {
  description = "Per-pod requests of the vLLM engine: CPU, memory, GPUs, and its model cache volume."
  type = object({
    cpu        = string
    memory     = string
    gpu        = number
    pvc_size   = string
    extra_args = list(string)
  })
  default = {
    cpu        = "4"
    memory     = "16Gi"
    gpu        = 1
    pvc_size   = "50Gi"
    extra_args = ["--enable-prefix-caching"]
  }
}
