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
{{- $ref := printf "%s/%s:%s" .root.Values.image.repository .name (.root.Values.image.tag | default .root.Chart.AppVersion) -}}
{{ include "sigil.withRegistry" (dict "root" .root "ref" $ref) }}
{{- end -}}

{{/* The Node API address agents dial. */}}
{{- define "sigil.nodeAPIAddress" -}}
{{ include "sigil.fullname" . }}-operator.{{ .Release.Namespace }}.svc:{{ .Values.operator.nodeAPIPort }}
{{- end -}}

{{/* An image reference with global.imageRegistry applied: the registry host (the first
path component, when it holds a '.' or ':' or is localhost) is replaced, or prepended
when the reference has none. */}}
{{- define "sigil.withRegistry" -}}
{{- $registry := .root.Values.imageRegistry -}}
{{- if not $registry -}}
{{ .ref }}
{{- else -}}
{{- $parts := splitn "/" 2 .ref -}}
{{- $first := $parts._0 -}}
{{- if and $parts._1 (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) -}}
{{ trimSuffix "/" $registry }}/{{ $parts._1 }}
{{- else -}}
{{ trimSuffix "/" $registry }}/{{ .ref }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Pod-level scheduling and pull settings shared by the operator and agent pods:
imagePullSecrets (global), then the component's priorityClassName, nodeSelector,
tolerations and affinity. `.values` is the component's values; `.affinity` the default
affinity when the component sets none. */}}
{{- define "sigil.podScheduling" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (.values.affinity | default .affinity) }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
