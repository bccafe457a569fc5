{{/* Names, labels and small shared pieces of the k8s-gpu-monitor chart. */}}

{{- define "gpumon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>", or the release name when it already contains the chart name. */}}
{{- define "gpumon.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gpumon.exporter.fullname" -}}
{{- printf "%s-exporter" (include "gpumon.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpumon.analytics.fullname" -}}
{{- printf "%s-analytics" (include "gpumon.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpumon.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpumon.labels" -}}
helm.sh/chart: {{ include "gpumon.chart" . }}
app.kubernetes.io/name: {{ include "gpumon.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: k8s-gpu-monitor
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "exporter"). */}}
{{- define "gpumon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpumon.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "gpumon.componentLabels" -}}
{{ include "gpumon.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* repository:tag, or repository@digest (tag kept for readability) when a digest is set. */}}
{{- define "gpumon.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "gpumon.exporter.serviceAccountName" -}}
{{- if .Values.exporter.serviceAccount.create -}}
{{- default (include "gpumon.exporter.fullname" .) .Values.exporter.serviceAccount.name -}}
{{- else -}}
{{- required "exporter.serviceAccount.name is required when exporter.serviceAccount.create is false" .Values.exporter.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gpumon.analytics.serviceAccountName" -}}
{{- if .Values.analytics.serviceAccount.create -}}
{{- default (include "gpumon.analytics.fullname" .) .Values.analytics.serviceAccount.name -}}
{{- else -}}
{{- required "analytics.serviceAccount.name is required when analytics.serviceAccount.create is false" .Values.analytics.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The exporter's PriorityClass: an existing one, else the chart's own, else none. */}}
{{- define "gpumon.exporter.priorityClassName" -}}
{{- if .Values.exporter.priorityClassName -}}
{{- .Values.exporter.priorityClassName -}}
{{- else if .Values.exporter.priorityClass.create -}}
{{- include "gpumon.exporter.fullname" . -}}
{{- end -}}
{{- end -}}

{{/* "true" when the exporter maps GPU processes to pods (hostPID and /proc are needed). */}}
{{- define "gpumon.exporter.processes" -}}
{{- if has "process" .Values.exporter.collectors }}true{{ end -}}
{{- end -}}

{{/* "true" when the exporter asks the kubelet which pod holds which device. */}}
{{- define "gpumon.exporter.allocations" -}}
{{- if has "allocation" .Values.exporter.collectors }}true{{ end -}}
{{- end -}}

{{/* "true" when the exporter runs the pod informer (it needs the API server). */}}
{{- define "gpumon.exporter.needsApi" -}}
{{- if or (include "gpumon.exporter.processes" .) (include "gpumon.exporter.allocations" .) }}true{{ end -}}
{{- end -}}

{{/* Whether a prometheus-operator scrape object is rendered. */}}
{{- define "gpumon.operatorScrape" -}}
{{- if has .Values.monitoring.kind (list "serviceMonitor" "podMonitor") }}true{{ end -}}
{{- end -}}

{{/* A DNS-1123 name piece from a file name: "my_rules.yml" -> "my-rules". */}}
{{- define "gpumon.fileSlug" -}}
{{- $stem := base . | trimSuffix (ext .) | lower -}}
{{- regexReplaceAll "[^a-z0-9-]+" $stem "-" | trimAll "-" -}}
{{- end -}}

{{/* Prometheus annotations on a pod, for monitoring.kind annotations: (dict "port" N). */}}
{{- define "gpumon.scrapeAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end -}}

{{/* The relabeling that names the scrape job, for ServiceMonitor and PodMonitor endpoints. */}}
{{- define "gpumon.jobRelabeling" -}}
- action: replace
  targetLabel: job
  replacement: {{ . | quote }}
{{- end -}}

{{/* Restricted container security context shared by both components. */}}
{{- define "gpumon.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
