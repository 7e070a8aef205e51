{{/* Names and labels. */}}
{{- define "noetl-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "noetl-worker.fullname" -}}
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

{{- define "noetl-worker.pool" -}}
{{- include "noetl-worker.str" .Values.config.WORKER_POOL_NAME | default "default" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "noetl-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "noetl-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "noetl-worker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "noetl-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: worker
noetl.io/pool: {{ include "noetl-worker.pool" . | quote }}
{{- end }}

{{- define "noetl-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "noetl-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
A config value as the env string. Helm parses numbers in values files as
float64 (268435456 would print as 2.68435456e+08), so whole floats print as
integers; null prints as empty, which means unset.
*/}}
{{- define "noetl-worker.str" -}}
{{- if kindIs "invalid" . }}
{{- else if kindIs "float64" . }}
{{- if eq . (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "map" .) (kindIs "slice" .) }}
{{- fail (printf "config values must be scalars, got %s" (kindOf .)) }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* A duration of docs/configuration.md ("20", "2.5", "500ms", "10s", "10m", "1h") in seconds. */}}
{{- define "noetl-worker.seconds" -}}
{{- $v := lower (trim (index . 1)) }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(ms|s|m|h)?$" $v) }}
{{- fail (printf "config.%s=%q is not a duration; accepted: seconds (20, 2.5) or a suffix (500ms, 10s, 10m, 1h)" (index . 0) $v) }}
{{- end }}
{{- if hasSuffix "ms" $v }}{{ divf (trimSuffix "ms" $v | float64) 1000 }}
{{- else if hasSuffix "m" $v }}{{ mulf (trimSuffix "m" $v | float64) 60 }}
{{- else if hasSuffix "h" $v }}{{ mulf (trimSuffix "h" $v | float64) 3600 }}
{{- else }}{{ trimSuffix "s" $v | float64 }}{{ end }}
{{- end }}

{{/* A Kubernetes quantity ("256Mi", "1Gi", "500M", "268435456") in bytes, as an integer. */}}
{{- define "noetl-worker.bytes" -}}
{{- $v := trim (toString (index . 1)) }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|k|K|M|G|T)?$" $v) }}
{{- fail (printf "%s=%q is not a memory quantity; accepted: bytes or a suffix (Ki, Mi, Gi, Ti, k, M, G, T)" (index . 0) $v) }}
{{- end }}
{{- $units := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 }}
{{- $number := regexReplaceAll "^([0-9.]+).*$" $v "${1}" | float64 }}
{{- $unit := regexReplaceAll "^[0-9.]+" $v "" }}
{{- mulf $number (index $units $unit) | floor | int64 }}
{{- end }}

{{/*
The memory plan as JSON {"cache": bytes or "", "python": MiB or ""}: explicit config values
kept, empty ones derived from resources.limits.memory (values.yaml: memoryPlan), and the render
failed when they cannot all fit in the limit. Without a memory limit nothing is derived.
*/}}
{{- define "noetl-worker.memoryPlan" -}}
{{- $cacheRaw := include "noetl-worker.str" .Values.config.NOETL_IPC_CACHE_BUDGET_BYTES }}
{{- $pyRaw := include "noetl-worker.str" .Values.config.NOETL_PYTHON_MEMORY_LIMIT_MB }}
{{- $limitRaw := "" }}
{{- with .Values.resources }}{{ with .limits }}{{ $limitRaw = toString (.memory | default "") }}{{ end }}{{ end }}
{{- if eq $limitRaw "" }}
{{- dict "cache" $cacheRaw "python" $pyRaw | toJson }}
{{- else }}
{{- $mi := 1048576 }}
{{- $slots := include "noetl-worker.str" .Values.config.WORKER_MAX_CONCURRENT | default "1" | int64 }}
{{- $plan := .Values.memoryPlan }}
{{- $limit := include "noetl-worker.bytes" (list "resources.limits.memory" $limitRaw) | int64 }}
{{- $reserve := mul (int64 $plan.workerReserveMi) $mi }}
{{- $available := sub $limit $reserve }}
{{- if le $available 0 }}
{{- fail (printf "resources.limits.memory=%s leaves nothing after memoryPlan.workerReserveMi (%d MiB) for the Arrow IPC cache and python steps: raise the limit" $limitRaw (int64 $plan.workerReserveMi)) }}
{{- end }}
{{- $cache := 0 }}
{{- if ne $cacheRaw "" }}{{ $cache = int64 $cacheRaw }}
{{- else }}{{ $cache = mul (div (div (mul $available (int64 $plan.ipcCachePercent)) 100) $mi) $mi }}{{ end }}
{{- if gt $cache $available }}
{{- fail (printf "config.NOETL_IPC_CACHE_BUDGET_BYTES=%d (%d MiB) does not fit in resources.limits.memory=%s after memoryPlan.workerReserveMi (%d MiB); shared memory counts against the pod's limit: raise the limit or lower the budget" $cache (div $cache $mi) $limitRaw (int64 $plan.workerReserveMi)) }}
{{- end }}
{{- $python := 0 }}
{{- if ne $pyRaw "" }}{{ $python = int64 $pyRaw }}
{{- else }}
{{- $python = div (div (sub $available $cache) $slots) $mi }}
{{- if lt $python (int64 $plan.minPythonMi) }}
{{- fail (printf "resources.limits.memory=%s leaves %d MiB per python step with WORKER_MAX_CONCURRENT=%d (after memoryPlan.workerReserveMi %d MiB and a %d MiB IPC cache); at least memoryPlan.minPythonMi=%d MiB is needed: raise the memory limit, lower WORKER_MAX_CONCURRENT or the cache budget, or set config.NOETL_PYTHON_MEMORY_LIMIT_MB explicitly (0 turns the guard off)" $limitRaw $python $slots (int64 $plan.workerReserveMi) (div $cache $mi) (int64 $plan.minPythonMi)) }}
{{- end }}
{{- end }}
{{- $needed := add $reserve $cache (mul $python $mi $slots) }}
{{- if gt $needed $limit }}
{{- fail (printf "resources.limits.memory=%s (%d MiB) cannot hold memoryPlan.workerReserveMi (%d MiB) + NOETL_IPC_CACHE_BUDGET_BYTES (%d MiB) + NOETL_PYTHON_MEMORY_LIMIT_MB (%d MiB) x WORKER_MAX_CONCURRENT (%d) = %d MiB: the python guard and the cache would only be stopped by the OOM killer. Raise the limit, lower these values, or leave them empty to derive them from the limit" $limitRaw (div $limit $mi) (int64 $plan.workerReserveMi) (div $cache $mi) $python $slots (div $needed $mi)) }}
{{- end }}
{{- dict "cache" (toString $cache) "python" (toString $python) | toJson }}
{{- end }}
{{- end }}

{{/* KEDA's NATS monitoring endpoint: explicit, else the host of the first NATS_URL entry. */}}
{{- define "noetl-worker.natsMonitoringEndpoint" -}}
{{- if .Values.keda.natsServerMonitoringEndpoint }}
{{- .Values.keda.natsServerMonitoringEndpoint }}
{{- else }}
{{- $url := include "noetl-worker.str" .Values.config.NATS_URL | default "nats://localhost:4222" }}
{{- $first := trim (first (splitList "," $url)) }}
{{- $host := regexReplaceAll "^[a-z]+://([^@/]*@)?(\\[[^]]+\\]|[^:/]+).*$" $first "${2}" }}
{{- printf "%s:%d" $host (int .Values.keda.natsMonitoringPort) }}
{{- end }}
{{- end }}

{{/* The image reference: repository@digest, else repository:tag (the chart's appVersion by default). */}}
{{- define "noetl-worker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (toString (.Values.image.tag | default .Chart.AppVersion)) }}
{{- end }}
{{- end }}

{{/* The most replicas this release can run (KEDA's ceiling when KEDA is on). */}}
{{- define "noetl-worker.maxReplicas" -}}
{{- if .Values.keda.enabled }}{{ int .Values.keda.maxReplicas }}{{ else }}{{ int .Values.workload.replicas }}{{ end }}
{{- end }}

{{/* Render-time checks: a wrong combination fails `helm template`/`install`. */}}
{{- define "noetl-worker.validate" -}}
{{- $kind := .Values.workload.kind }}
{{- if not (has $kind (list "Deployment" "StatefulSet")) }}
{{- fail (printf "workload.kind=%q; accepted: Deployment, StatefulSet" $kind) }}
{{- end }}
{{- $tgps := int .Values.workload.terminationGracePeriodSeconds }}
{{- $graceRaw := include "noetl-worker.str" .Values.config.NOETL_WORKER_SHUTDOWN_GRACE_SECONDS | default "20" }}
{{- $grace := include "noetl-worker.seconds" (list "NOETL_WORKER_SHUTDOWN_GRACE_SECONDS" $graceRaw) | float64 }}
{{- if ge $grace (float64 (sub $tgps 5)) }}
{{- fail (printf "config.NOETL_WORKER_SHUTDOWN_GRACE_SECONDS=%s must be below workload.terminationGracePeriodSeconds - 5 (= %d) so deregistration and the NATS drain fit before SIGKILL" $graceRaw (sub $tgps 5)) }}
{{- end }}
{{- $bind := include "noetl-worker.str" .Values.config.WORKER_METRICS_BIND | default "0.0.0.0:9090" }}
{{- if not (hasSuffix (printf ":%d" (int .Values.metrics.port)) $bind) }}
{{- fail (printf "config.WORKER_METRICS_BIND=%q must use metrics.port %d (the probes and scrapes target it)" $bind (int .Values.metrics.port)) }}
{{- end }}
{{- if ne (include "noetl-worker.str" .Values.config.NATS_PASSWORD) "" }}
{{- fail "config.NATS_PASSWORD must stay empty: put the password in a Secret and set secrets.natsPassword.secretName/key" }}
{{- end }}
{{- if ne (include "noetl-worker.str" .Values.config.NOETL_INTERNAL_API_TOKEN) "" }}
{{- fail "config.NOETL_INTERNAL_API_TOKEN must stay empty: put the token in a Secret and set secrets.internalApiToken.secretName/key" }}
{{- end }}
{{- if eq $kind "StatefulSet" }}
{{- if ne (include "noetl-worker.str" .Values.config.NOETL_SNOWFLAKE_NODE_ID) "" }}
{{- fail "config.NOETL_SNOWFLAKE_NODE_ID must stay empty with workload.kind=StatefulSet: the pod index is the node id; shift it with snowflake.nodeIdOffset" }}
{{- end }}
{{- $offset := int .Values.snowflake.nodeIdOffset }}
{{- $max := int (include "noetl-worker.maxReplicas" .) }}
{{- if or (lt $offset 0) (gt (add $offset $max) 1024) }}
{{- fail (printf "snowflake.nodeIdOffset (%d) + max replicas (%d) must be within 0..1024: snowflake node ids are 10 bits (0-1023)" $offset $max) }}
{{- end }}
{{- end }}
{{- if .Values.keda.enabled }}
{{- if gt (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas) }}
{{- fail (printf "keda.minReplicas (%d) must not exceed keda.maxReplicas (%d)" (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.service.enabled) }}
{{- fail "serviceMonitor.enabled needs service.enabled (or use podMonitor.enabled)" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled .Values.podMonitor.enabled }}
{{- fail "podMonitor.enabled and serviceMonitor.enabled would scrape every pod twice (doubling replica counts and in-flight sums): enable one of them" }}
{{- end }}
{{- $memory := include "noetl-worker.memoryPlan" . | fromJson }}
{{- if and .Values.shm.enabled (ne $memory.cache "") }}
{{- $shm := include "noetl-worker.bytes" (list "shm.sizeLimit" .Values.shm.sizeLimit) | int64 }}
{{- if lt $shm (int64 $memory.cache) }}
{{- fail (printf "shm.sizeLimit=%s is smaller than the IPC cache budget (%s bytes): raise shm.sizeLimit or lower config.NOETL_IPC_CACHE_BUDGET_BYTES" (toString .Values.shm.sizeLimit) $memory.cache) }}
{{- end }}
{{- end }}
{{- range .Values.keychainSecrets }}
{{- if not (regexMatch "^[A-Za-z_][A-Za-z0-9_]*$" (toString .name)) }}
{{- fail (printf "keychainSecrets name %q is not an environment variable name" (toString .name)) }}
{{- end }}
{{- if hasKey $.Values.config .name }}
{{- fail (printf "keychainSecrets name %q is a worker setting; keychain entries must use other names" .name) }}
{{- end }}
{{- if or (not .secretName) (not .key) }}
{{- fail (printf "keychainSecrets entry %q needs secretName and key" (toString .name)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The worker container's env: config map first, then the special cases. */}}
{{- define "noetl-worker.env" -}}
{{- $special := list "WORKER_ID" "NODE_NAME" "NOETL_SNOWFLAKE_NODE_ID" "NOETL_KEYCHAIN_ENV_VARS" "NATS_PASSWORD" "NOETL_INTERNAL_API_TOKEN" "NOETL_IPC_CACHE_BUDGET_BYTES" "NOETL_PYTHON_MEMORY_LIMIT_MB" }}
{{- range $name := keys .Values.config | sortAlpha }}
{{- $value := include "noetl-worker.str" (index $.Values.config $name) }}
{{- if and (ne $value "") (not (has $name $special)) }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- $memory := include "noetl-worker.memoryPlan" . | fromJson }}
{{- if ne $memory.cache "" }}
- name: NOETL_IPC_CACHE_BUDGET_BYTES
  value: {{ $memory.cache | quote }}
{{- end }}
{{- if ne $memory.python "" }}
- name: NOETL_PYTHON_MEMORY_LIMIT_MB
  value: {{ $memory.python | quote }}
{{- end }}
{{- $workerId := include "noetl-worker.str" .Values.config.WORKER_ID }}
{{- if ne $workerId "" }}
- name: WORKER_ID
  value: {{ $workerId | quote }}
{{- else if .Values.workerId.fromPodName }}
- name: WORKER_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}
{{- $nodeName := include "noetl-worker.str" .Values.config.NODE_NAME }}
{{- if ne $nodeName "" }}
- name: NODE_NAME
  value: {{ $nodeName | quote }}
{{- else }}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- end }}
{{- if eq .Values.workload.kind "StatefulSet" }}
- name: NOETL_SNOWFLAKE_NODE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
- name: NOETL_SNOWFLAKE_NODE_ID_OFFSET
  value: {{ int .Values.snowflake.nodeIdOffset | toString | quote }}
{{- else }}
{{- $nodeId := include "noetl-worker.str" .Values.config.NOETL_SNOWFLAKE_NODE_ID }}
{{- if ne $nodeId "" }}
- name: NOETL_SNOWFLAKE_NODE_ID
  value: {{ $nodeId | quote }}
{{- end }}
{{- end }}
{{- with .Values.secrets.natsPassword }}
{{- if .secretName }}
- name: NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- with .Values.secrets.internalApiToken }}
{{- if .secretName }}
- name: NOETL_INTERNAL_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- $keychain := list }}
{{- range splitList "," (include "noetl-worker.str" .Values.config.NOETL_KEYCHAIN_ENV_VARS) }}
{{- if trim . }}{{ $keychain = append $keychain (trim .) }}{{ end }}
{{- end }}
{{- range .Values.keychainSecrets }}
{{- if not (has .name $keychain) }}{{ $keychain = append $keychain .name }}{{ end }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- if $keychain }}
- name: NOETL_KEYCHAIN_ENV_VARS
  value: {{ join "," $keychain | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod template shared by the Deployment and the StatefulSet. */}}
{{- define "noetl-worker.podTemplate" -}}
metadata:
  labels:
    {{- include "noetl-worker.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/component: worker
    noetl.io/pool: {{ include "noetl-worker.pool" . | quote }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "noetl-worker.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  # Service env vars (NOETL_PORT, NATS_SERVICE_HOST, ...) would only add noise to the worker's env.
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ int .Values.workload.terminationGracePeriodSeconds }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: worker
      image: {{ include "noetl-worker.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      ports:
        - name: metrics
          containerPort: {{ int .Values.metrics.port }}
          protocol: TCP
      env:
        {{- include "noetl-worker.env" . | trim | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        {{- toYaml .Values.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        {{- toYaml .Values.probes.readiness | nindent 8 }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if .Values.shm.enabled }}
        - name: shm
          mountPath: /dev/shm
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmp.sizeLimit }}
    {{- if .Values.shm.enabled }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.shm.sizeLimit }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
