{{/*
Names: the release name when it already says batch-gateway, else "<release>-batch-gateway". Truncated so that the
longest suffix (-argo-executor) still fits Kubernetes' 63 characters.
*/}}
{{- define "batch-gateway.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 49 | trimSuffix "-" -}}
{{- else if contains "batch-gateway" .Release.Name -}}
{{- .Release.Name | trunc 49 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-batch-gateway" .Release.Name | trunc 49 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The labels the kustomize base puts on objects (and selects by), for a component or none. */}}
{{- define "batch-gateway.selectorLabels" -}}
app.kubernetes.io/name: batch-gateway
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* Every object's labels: the base's, plus Helm's bookkeeping. Call with (dict "root" $ "component" "api"). */}}
{{- define "batch-gateway.labels" -}}
{{ include "batch-gateway.selectorLabels" . }}
app.kubernetes.io/part-of: batch-gateway
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* Pod and Workflow labels: the base's, plus the release. */}}
{{- define "batch-gateway.podLabels" -}}
{{ include "batch-gateway.selectorLabels" . }}
app.kubernetes.io/part-of: batch-gateway
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* The image, with the chart's appVersion as the tag unless the repository carries a tag or digest of its own. */}}
{{- define "batch-gateway.image" -}}
{{- $repository := .Values.image.repository -}}
{{- $last := last (splitList "/" $repository) -}}
{{- if or (contains ":" $last) (contains "@" $last) -}}
{{- $repository -}}
{{- else -}}
{{- printf "%s:%s" $repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{- define "batch-gateway.secretName" -}}
{{- .Values.secret.name | default (printf "%s-secrets" (include "batch-gateway.fullname" .)) -}}
{{- end -}}

{{/* envFrom and env of every gateway container (API, runner, exit handler, gc). */}}
{{- define "batch-gateway.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "batch-gateway.fullname" . }}-config
  - secretRef:
      name: {{ include "batch-gateway.secretName" . }}
env:
  # Workflows go to the namespace the API runs in.
  - name: BATCH_GATEWAY_ARGO_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  - name: POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
{{- end -}}

{{- define "batch-gateway.activeDeadlineSeconds" -}}
{{- if kindIs "invalid" .Values.runner.activeDeadlineSeconds -}}
{{- add (int .Values.limits.completionWindowSeconds) 7200 -}}
{{- else -}}
{{- int .Values.runner.activeDeadlineSeconds -}}
{{- end -}}
{{- end -}}
