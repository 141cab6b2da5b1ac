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

{{/* Labels on every resource. The component is not in the selector labels:
a Deployment's selector cannot change on upgrade. */}}
{{- define "room-allocator.labels" -}}
helm.sh/chart: {{ include "room-allocator.chart" . }}
{{ include "room-allocator.selectorLabels" . }}
app.kubernetes.io/component: allocator
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

{{/* Refuses configurations that would hand out duplicate rooms, or that
the binary would refuse at start. */}}
{{- define "room-allocator.validate" -}}
{{- if and (not (include "room-allocator.etcdMode" .)) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount is %d but the embedded store supports exactly 1 replica: two pods would each own a copy of the room space and hand out duplicate rooms. Set etcd.endpoints to run several replicas on a shared etcd store." (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret: a Secret with tls.crt and tls.key (and ca.crt with tls.requireClientCert)" }}
{{- end }}
{{- if and .Values.tls.clientAllowedNames (not .Values.tls.requireClientCert) }}
{{- fail "tls.clientAllowedNames needs tls.requireClientCert: the names are checked on client certificates" }}
{{- end }}
{{- if and .Values.tls.requireClientCert (not .Values.tls.enabled) }}
{{- fail "tls.requireClientCert needs tls.enabled: client certificates are checked during the TLS handshake" }}
{{- end }}
{{- if and .Values.auth.requireForAllocation (not .Values.auth.existingSecret) }}
{{- fail "auth.requireForAllocation needs auth.existingSecret: a Secret whose key \"token\" holds the bearer token" }}
{{- end }}
{{- if and .Values.auth.allowUnauthenticatedAllocation (not .Values.auth.existingSecret) }}
{{- fail "auth.allowUnauthenticatedAllocation needs auth.existingSecret: without a token every call is open already" }}
{{- end }}
{{- if and .Values.auth.allowUnauthenticatedAllocation .Values.auth.requireForAllocation }}
{{- fail "auth.allowUnauthenticatedAllocation and auth.requireForAllocation contradict each other (the server refuses both flags): requiring the token for every call is the default with auth.existingSecret; remove one" }}
{{- end }}
{{- /* The binary takes --etcd-username and its password only together, and
only with --etcd-endpoints: anything else renders a pod that exits at start,
over and over. */}}
{{- $etcdAuth := .Values.etcd.auth }}
{{- if not (include "room-allocator.etcdMode" .) }}
{{- if or $etcdAuth.username $etcdAuth.existingSecret }}
{{- fail "etcd.auth is set but etcd.endpoints is empty: the embedded store has no etcd to log in to, and the server refuses etcd credentials without --etcd-endpoints. Set etcd.endpoints to use etcd, or remove etcd.auth.username and etcd.auth.existingSecret." }}
{{- end }}
{{- if or .Values.etcd.tls.existingSecret .Values.etcd.tls.clientCert }}
{{- fail "etcd.tls is set but etcd.endpoints is empty: the embedded store would ignore it. Set etcd.endpoints to use etcd, or remove etcd.tls.existingSecret and etcd.tls.clientCert." }}
{{- end }}
{{- end }}
{{- if and $etcdAuth.username (not $etcdAuth.existingSecret) }}
{{- fail "etcd.auth.username needs etcd.auth.existingSecret holding the password" }}
{{- end }}
{{- if and $etcdAuth.existingSecret (not $etcdAuth.username) }}
{{- fail (printf "etcd.auth.existingSecret needs etcd.auth.username: the server sends the password from Secret %s only together with --etcd-username, and refuses to start with a password alone. Set etcd.auth.username to the etcd user, or remove etcd.auth.existingSecret." $etcdAuth.existingSecret) }}
{{- end }}
{{- if and .Values.etcd.tls.clientCert (not .Values.etcd.tls.existingSecret) }}
{{- fail "etcd.tls.clientCert needs etcd.tls.existingSecret: a Secret with tls.crt and tls.key (and ca.crt) to present to etcd" }}
{{- end }}
{{- include "room-allocator.validateAlerts" . }}
{{- /* Rooms are decimal strings without leading zeros (the schema checks
that), so the longer one is the larger, and equal lengths compare as text. */}}
{{- $min := toString .Values.minRoom }}
{{- $max := toString .Values.maxRoom }}
{{- if or (gt (len $min) (len $max)) (and (eq (len $min) (len $max)) (gt $min $max)) }}
{{- fail (printf "minRoom %s is above maxRoom %s: the room range [minRoom, maxRoom] is inclusive and must not be empty" $min $max) }}
{{- end }}
{{- if and .Values.grpcRoute.enabled (not .Values.grpcRoute.parentRefs) }}
{{- fail "grpcRoute.enabled needs grpcRoute.parentRefs: the Gateway(s) the GRPCRoute attaches to" }}
{{- end }}
{{- end }}

{{/* Seconds the kubelet waits after SIGTERM: the server's whole drain plus slack. */}}
{{- define "room-allocator.terminationGracePeriod" -}}
{{- add (int .Values.shutdown.drainDelaySecs) (int .Values.shutdown.drainTimeoutSecs) 10 }}
{{- end }}

{{/* The image: repository@digest when a digest is set, else repository:tag. */}}
{{- define "room-allocator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The headless Service's name: at most 63 characters like every Service. */}}
{{- define "room-allocator.headlessName" -}}
{{- printf "%s-headless" (include "room-allocator.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/* Labels of the test pod. They differ from the server's selector labels
(another app.kubernetes.io/name), so the Service never sends router calls to
the test pod. */}}
{{- define "room-allocator.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "room-allocator.name" . | trunc 58 | trimSuffix "-" }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{/* Refuses alert rules whose selector can match no series: the default
selector names the job a ServiceMonitor gives (the Service's name), which no
series has when Prometheus scrapes the pods by their annotations, or when a
relabeling rewrites the job or namespace label. Such rules never fire, not
even RoomAllocatorDown's absent(): it would fire from the start instead. */}}
{{- define "room-allocator.validateAlerts" -}}
{{- $rule := .Values.metrics.prometheusRule }}
{{- if and $rule.enabled (not $rule.selector) }}
{{- if not .Values.serviceMonitor.enabled }}
{{- fail (printf "metrics.prometheusRule.enabled with the default selector (namespace=%q,job=%q) needs serviceMonitor.enabled: without a ServiceMonitor Prometheus scrapes the pods by their prometheus.io annotations and gives them another job label, so no alert would ever match: set metrics.prometheusRule.selector or enable the ServiceMonitor. The selector is the labels your scrape config gives the pods, e.g. job=\"kubernetes-pods\",namespace=%q,app_kubernetes_io_instance=%q." .Release.Namespace (include "room-allocator.fullname" .) .Release.Namespace .Release.Name) }}
{{- end }}
{{- range $field := list "relabelings" "metricRelabelings" }}
{{- range (index $.Values.serviceMonitor $field) }}
{{- $action := .action | default "replace" | lower }}
{{- $target := .targetLabel | default "" }}
{{- $rewrites := and (has $target (list "job" "namespace")) (has $action (list "replace" "lowercase" "uppercase")) }}
{{- $pattern := printf "^(?:%s)$" (.regex | default "(.*)") }}
{{- if $rewrites }}
{{- fail (printf "serviceMonitor.%s rewrites the label %s, which the alerts' default selector matches on: set metrics.prometheusRule.selector to the labels the series end up with" $field $target) }}
{{- end }}
{{- range $label := list "job" "namespace" }}
{{- $matched := regexMatch $pattern $label }}
{{- if or (and (eq $action "labeldrop") $matched) (and (eq $action "labelkeep") (not $matched)) }}
{{- fail (printf "serviceMonitor.%s rewrites the label %s (action %s drops it), which the alerts' default selector matches on: set metrics.prometheusRule.selector to the labels the series end up with" $field $label $action) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* PromQL label matchers that pick this release's series. */}}
{{- define "room-allocator.ruleSelector" -}}
{{- .Values.metrics.prometheusRule.selector | default (printf "namespace=%q,job=%q" .Release.Namespace (include "room-allocator.fullname" .)) }}
{{- end }}
