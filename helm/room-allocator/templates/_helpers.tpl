{{/* Chart name, at most 63 characters (a DNS label). */}}
{{- define "room-allocator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, at most 63 characters. */}}
{{- define "room-allocator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "room-allocator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "room-allocator.labels" -}}
helm.sh/chart: {{ include "room-allocator.chart" . }}
{{ include "room-allocator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: room-allocator
{{- end }}

{{/* Selector labels: stable across upgrades, so no chart version here. */}}
{{- define "room-allocator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "room-allocator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "room-allocator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "room-allocator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* True (non-empty) in etcd mode. */}}
{{- define "room-allocator.etcdMode" -}}
{{- if .Values.etcd.endpoints }}true{{ end }}
{{- end }}

{{/* Refuses configurations that would hand out duplicate rooms. */}}
{{- define "room-allocator.validate" -}}
{{- if and (not (include "room-allocator.etcdMode" .)) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount is %d but the embedded store supports exactly 1 replica: two pods would each own a copy of the room space and hand out duplicate rooms. Set etcd.endpoints to run several replicas on a shared etcd store." (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret: a Secret with tls.crt and tls.key (and ca.crt with tls.requireClientCert)" }}
{{- end }}
{{- if and .Values.etcd.auth.username (not .Values.etcd.auth.existingSecret) }}
{{- fail "etcd.auth.username needs etcd.auth.existingSecret holding the password" }}
{{- end }}
{{- end }}

{{/* Seconds the kubelet waits after SIGTERM: the server's whole drain plus slack. */}}
{{- define "room-allocator.terminationGracePeriod" -}}
{{- add (int .Values.shutdown.drainDelaySecs) (int .Values.shutdown.drainTimeoutSecs) 10 }}
{{- end }}
