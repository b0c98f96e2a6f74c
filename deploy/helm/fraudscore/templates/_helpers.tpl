{{/* Names and labels. */}}
{{- define "fraudscore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fraudscore.fullname" -}}
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

{{- define "fraudscore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fraudscore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fraudscore.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fraudscore.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "fraudscore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fraudscore.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Every setting of service/runtime/config.py, as FRAUDSCORE_* names (tests/deploy/test_helm.py
keeps this list equal to the Settings fields), and the ones the chart sets itself. */}}
{{- define "fraudscore.knownSettings" -}}
{{- list
  "FRAUDSCORE_HOST" "FRAUDSCORE_PORT" "FRAUDSCORE_METRICS_HOST" "FRAUDSCORE_METRICS_PORT"
  "FRAUDSCORE_MODEL_DIR" "FRAUDSCORE_CHALLENGER_MODEL_DIR" "FRAUDSCORE_RULES_FILE"
  "FRAUDSCORE_RULES_RELOAD_S" "FRAUDSCORE_MODEL_RELOAD_S" "FRAUDSCORE_STATE_DIR"
  "FRAUDSCORE_SNAPSHOT_INTERVAL_S" "FRAUDSCORE_STATE_URL" "FRAUDSCORE_STATE_URL_FILE" "FRAUDSCORE_STATE_CA_FILE" "FRAUDSCORE_STATE_TTL_S"
  "FRAUDSCORE_STATE_TIMEOUT_MS" "FRAUDSCORE_WORKERS" "FRAUDSCORE_BUDGET_MS" "FRAUDSCORE_MAX_BATCH"
  "FRAUDSCORE_MAX_WAIT_US" "FRAUDSCORE_MAX_QUEUE" "FRAUDSCORE_SHED_MODE"
  "FRAUDSCORE_MAX_BATCH_REQUEST" "FRAUDSCORE_MAX_STREAM_MESSAGES" "FRAUDSCORE_MAX_MESSAGE_BYTES"
  "FRAUDSCORE_MAX_CONCURRENT_RPCS" "FRAUDSCORE_MAX_PENDING_RPCS" "FRAUDSCORE_MAX_CLOCK_SKEW_S" "FRAUDSCORE_SHUTDOWN_GRACE_S"
  "FRAUDSCORE_IDEMPOTENCY_TTL_S" "FRAUDSCORE_IDEMPOTENCY_MAX_ENTRIES" "FRAUDSCORE_ID_HASH_KEY"
  "FRAUDSCORE_ID_HASH_KEY_FILE"
  "FRAUDSCORE_CARD_CAPACITY" "FRAUDSCORE_ENTITY_CAPACITY" "FRAUDSCORE_REASONS_METHOD"
  "FRAUDSCORE_LOG_LEVEL" "FRAUDSCORE_FAULT_INJECTION"
  "FRAUDSCORE_TLS_CERT_FILE" "FRAUDSCORE_TLS_KEY_FILE" "FRAUDSCORE_TLS_CLIENT_CA_FILE"
  "FRAUDSCORE_AUTH_TOKENS_FILE" "FRAUDSCORE_AUTH_TOKENS_RELOAD_S" "FRAUDSCORE_HEALTH_PORT"
  "FRAUDSCORE_TLS_RELOAD_S" "FRAUDSCORE_MAX_CONNECTION_AGE_S"
  | toJson }}
{{- end }}

{{- define "fraudscore.chartOwnedSettings" -}}
{{- list
  "FRAUDSCORE_HOST" "FRAUDSCORE_PORT" "FRAUDSCORE_METRICS_HOST" "FRAUDSCORE_METRICS_PORT"
  "FRAUDSCORE_HEALTH_PORT" "FRAUDSCORE_STATE_DIR" "FRAUDSCORE_STATE_URL_FILE" "FRAUDSCORE_STATE_CA_FILE" "FRAUDSCORE_RULES_FILE"
  "FRAUDSCORE_SHUTDOWN_GRACE_S" "FRAUDSCORE_ID_HASH_KEY" "FRAUDSCORE_TLS_CERT_FILE"
  "FRAUDSCORE_TLS_KEY_FILE" "FRAUDSCORE_TLS_CLIENT_CA_FILE" "FRAUDSCORE_AUTH_TOKENS_FILE"
  | toJson }}
{{- end }}

{{/* Refuse config names the server does not know (it would ignore them silently) and names
the chart sets itself (two sources for one setting). */}}
{{- define "fraudscore.checkConfig" -}}
{{- $known := include "fraudscore.knownSettings" . | fromJsonArray }}
{{- $owned := include "fraudscore.chartOwnedSettings" . | fromJsonArray }}
{{- range $name, $value := .Values.config }}
{{- if not (has $name $known) }}
{{- fail (printf "config.%s: not a fraudscore setting (service/runtime/config.py lists them, each FRAUDSCORE_<FIELD NAME>); check the spelling" $name) }}
{{- end }}
{{- if has $name $owned }}
{{- fail (printf "config.%s: the chart sets this one itself; use its own value instead (values.yaml, comment above config)" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* TLS or auth on: the gRPC port needs TLS or a token, which kubelet probes cannot give,
so probes use the plaintext health-only port. */}}
{{/* Probes always go to the plaintext health-only port: the gRPC port refuses calls past
FRAUDSCORE_MAX_CONCURRENT_RPCS and drops those past its short queue, so under overload a probe
there could fail and the kubelet restart a pod that is only busy. */}}
{{- define "fraudscore.useHealthPort" -}}
true
{{- end }}

{{- define "fraudscore.probePort" -}}
{{- if include "fraudscore.useHealthPort" . }}{{ .Values.service.healthPort | int }}{{ else }}{{ .Values.service.grpcPort | int }}{{ end }}
{{- end }}

{{/* The drain: preStop sleep, then SIGTERM and up to shutdownGraceSeconds of draining. */}}
{{- define "fraudscore.drainSeconds" -}}
{{- add (.Values.lifecycle.preStopSleepSeconds | int) (ceil (.Values.shutdownGraceSeconds | float64) | int) }}
{{- end }}

{{- define "fraudscore.terminationGracePeriodSeconds" -}}
{{- $drain := include "fraudscore.drainSeconds" . | int }}
{{- if lt (.Values.shutdownGraceSeconds | float64) 0.0 }}
{{- fail (printf "shutdownGraceSeconds must be ≥ 0 (got %v)" .Values.shutdownGraceSeconds) }}
{{- end }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- if lt (.Values.terminationGraceMarginSeconds | int) 1 }}
{{- fail (printf "terminationGraceMarginSeconds must be ≥ 1 (got %v): the pod needs time after the drain for its final state snapshot" .Values.terminationGraceMarginSeconds) }}
{{- end }}
{{- add $drain (.Values.terminationGraceMarginSeconds | int) }}
{{- else }}
{{- $set := .Values.terminationGracePeriodSeconds | int }}
{{- if le $set $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be above lifecycle.preStopSleepSeconds + shutdownGraceSeconds (%v + %v = %d s): the kubelet would kill pods mid-drain, cutting in-flight calls and the final state snapshot. Raise it, or leave it empty (null) to compute drain + terminationGraceMarginSeconds" $set .Values.lifecycle.preStopSleepSeconds .Values.shutdownGraceSeconds $drain) }}
{{- end }}
{{- $set }}
{{- end }}
{{- end }}

{{/* The rules ConfigMap's name. */}}
{{- define "fraudscore.rulesConfigMap" -}}
{{- default (printf "%s-rules" (include "fraudscore.fullname" .)) .Values.rules.existingConfigMap }}
{{- end }}

{{- define "fraudscore.rulesContent" -}}
{{- default (.Files.Get "files/rules.json") .Values.rules.content }}
{{- end }}

{{/* A config value as the environment string the server parses. Helm reads every number in a
values file as a float64, which toString writes as 2e+06 for 2000000 (refused by the server):
a whole number is written as an integer. */}}
{{- define "fraudscore.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- if or (gt . 9.007199254740992e15) (lt . -9.007199254740992e15) }}
{{- fail (printf "the number %v is too large to pass exactly; quote it in the values file" .) }}
{{- end }}
{{- int64 . | toString }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* rules.extraFiles: each key a ConfigMap key, each path relative to the rules file's
directory (list files, docs/rules.md), inside it and not rules.json itself. */}}
{{- define "fraudscore.checkRulesExtraFiles" -}}
{{- $paths := list }}
{{- range $key, $file := .Values.rules.extraFiles }}
{{- if or (not (regexMatch "^[-._a-zA-Z0-9]+$" $key)) (eq $key ".") (eq $key "..") }}
{{- fail (printf "rules.extraFiles.%s: a ConfigMap key may hold only letters, digits, '-', '_' and '.', and may not be . or .." $key) }}
{{- end }}
{{- if eq $key "rules.json" }}
{{- fail "rules.extraFiles: the key rules.json is the rules file itself; name the list file's key otherwise" }}
{{- end }}
{{- $path := (default "" $file.path) }}
{{- if or (not $path) (hasPrefix "/" $path) (has ".." (splitList "/" $path)) (has "." (splitList "/" $path)) (has "" (splitList "/" $path)) (eq $path "rules.json") }}
{{- fail (printf "rules.extraFiles.%s.path: %q must be a path relative to the rules file's directory, inside it (e.g. lists/blocked_cards.txt, as the rules file names it), and not rules.json" $key $path) }}
{{- end }}
{{- if has $path $paths }}
{{- fail (printf "rules.extraFiles: two keys are mounted at %s" $path) }}
{{- end }}
{{- $paths = append $paths $path }}
{{- if and $.Values.rules.existingConfigMap $file.content }}
{{- fail (printf "rules.extraFiles.%s.content: with rules.existingConfigMap the file comes from that ConfigMap's key %s; leave content empty" $key $key) }}
{{- end }}
{{- if and (not $.Values.rules.existingConfigMap) (not $file.content) }}
{{- fail (printf "rules.extraFiles.%s.content is empty: give the file's text (or use rules.existingConfigMap holding key %s)" $key $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Fail early on combinations that cannot work. */}}
{{- define "fraudscore.validate" -}}
{{- include "fraudscore.checkConfig" . }}
{{- include "fraudscore.checkRulesExtraFiles" . }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret: the name of a kubernetes.io/tls Secret (tls.crt, tls.key)" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled (mutual TLS) needs tls.enabled" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.clientCA.existingSecret) }}
{{- fail "tls.clientCA.enabled needs tls.clientCA.existingSecret: the name of a Secret holding the client CA bundle" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) }}
{{- fail "auth.enabled needs auth.existingSecret: the name of a Secret holding the bearer tokens, one per line" }}
{{- end }}
{{- if and .Values.state.redis.enabled (not .Values.state.redis.existingSecret) }}
{{- fail "state.redis.enabled needs state.redis.existingSecret: the name of a Secret whose key (state.redis.secretKey) holds the Redis URL, redis://[user:password@]host:6379/0 or rediss://… for TLS" }}
{{- end }}
{{- if and .Values.state.redis.tls.caSecret (not .Values.state.redis.enabled) }}
{{- fail "state.redis.tls.caSecret is set but state.redis.enabled is not: the CA verifies the shared Redis's TLS certificate" }}
{{- end }}
{{- if and .Values.state.redis.enabled (hasKey .Values.config "FRAUDSCORE_STATE_URL") }}
{{- fail "config.FRAUDSCORE_STATE_URL and state.redis.enabled both name the shared store: keep state.redis (the URL stays in its Secret)" }}
{{- end }}
{{- $shared := or .Values.state.redis.enabled (hasKey .Values.config "FRAUDSCORE_STATE_URL") }}
{{- if and (not $shared) (gt (index .Values.config "FRAUDSCORE_WORKERS" | default 1 | int) 1) }}
{{- fail "config.FRAUDSCORE_WORKERS above 1 needs a shared state (state.redis.enabled with state.redis.existingSecret): each worker would keep its own part of every card's history" }}
{{- end }}
{{- if and (not $shared) (or .Values.autoscaling.enabled (gt (.Values.replicaCount | int) 1)) }}
{{- fail (printf "replicaCount %v / autoscaling.enabled %v with state in each pod would split every card's history between pods (each scores on its own part, silently): set state.redis.enabled with state.redis.existingSecret (one shared state), or replicaCount 1 and autoscaling.enabled false" .Values.replicaCount .Values.autoscaling.enabled) }}
{{- end }}
{{- if and .Values.state.existingClaim (or .Values.autoscaling.enabled (gt (.Values.replicaCount | int) 1)) }}
{{- fail "state.existingClaim is one volume for every pod: set replicaCount 1 and autoscaling.enabled false, or leave it empty for a per-pod emptyDir" }}
{{- end }}
{{- $ports := list (.Values.service.grpcPort | int) (.Values.service.metricsPort | int) }}
{{- if include "fraudscore.useHealthPort" . }}{{ $ports = append $ports (.Values.service.healthPort | int) }}{{ end }}
{{- if ne (len $ports) (len (uniq $ports)) }}
{{- fail (printf "service.grpcPort, service.metricsPort and service.healthPort must differ (got %v)" $ports) }}
{{- end }}
{{- end }}

{{/* Numba's cache (NUMBA_CACHE_DIR): on the writable state volume, wherever it is mounted. The
image's entrypoint copies its build-time cache there; on the read-only root it would fail. */}}
{{- define "fraudscore.numbaCacheDir" -}}
{{- printf "%s/numba-cache" (trimSuffix "/" .Values.state.mountPath) }}
{{- end }}
