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

{{/* A duration of docs/configuration.md ("20", "2.5", "500ms", "10s") in seconds. */}}
{{- define "noetl-worker.seconds" -}}
{{- $v := trim (index . 1) }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(ms|s)?$" $v) }}
{{- fail (printf "config.%s=%q is not a duration; accepted: seconds (20, 2.5) or a suffix (500ms, 10s)" (index . 0) $v) }}
{{- end }}
{{- if hasSuffix "ms" $v }}{{ divf (trimSuffix "ms" $v | float64) 1000 }}
{{- else }}{{ trimSuffix "s" $v | float64 }}{{ end }}
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
{{- $special := list "WORKER_ID" "NODE_NAME" "NOETL_SNOWFLAKE_NODE_ID" "NOETL_KEYCHAIN_ENV_VARS" "NATS_PASSWORD" "NOETL_INTERNAL_API_TOKEN" }}
{{- range $name := keys .Values.config | sortAlpha }}
{{- $value := include "noetl-worker.str" (index $.Values.config $name) }}
{{- if and (ne $value "") (not (has $name $special)) }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
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
      image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
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
