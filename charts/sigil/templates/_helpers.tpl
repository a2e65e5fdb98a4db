{{/* Common labels. */}}
{{- define "sigil.labels" -}}
app.kubernetes.io/name: sigil
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Name prefix of cluster-scoped objects, unique per release. */}}
{{- define "sigil.fullname" -}}
{{- if eq .Release.Name "sigil" -}}sigil{{- else -}}{{ printf "sigil-%s" .Release.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "sigil.image" -}}
{{ .root.Values.image.repository }}/{{ .name }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end -}}

{{/* The Node API address agents dial. */}}
{{- define "sigil.nodeAPIAddress" -}}
{{ include "sigil.fullname" . }}-operator.{{ .Release.Namespace }}.svc:{{ .Values.operator.nodeAPIPort }}
{{- end -}}
