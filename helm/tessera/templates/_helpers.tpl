{{/* Names, labels and shared fragments of the Tessera chart. */}}

{{/* The chart's name (label app.kubernetes.io/name). */}}
{{- define "tessera.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every resource name: the release name, with the chart's name unless it contains it. */}}
{{- define "tessera.fullname" -}}
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

{{/* chart-version label value. */}}
{{- define "tessera.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select one component's pods: call with (dict "root" $ "component" "worker"). */}}
{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The standard labels of one component's resources: call with (dict "root" $ "component" "worker"). */}}
{{- define "tessera.labels" -}}
helm.sh/chart: {{ include "tessera.chart" .root }}
{{ include "tessera.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: tessera
{{- end -}}

{{/* Names of the components' resources. */}}
{{- define "tessera.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "tessera.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "tessera.worker.fullname" -}}
{{- printf "%s-worker" (include "tessera.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "tessera.worker.headless" -}}
{{- printf "%s-worker-headless" (include "tessera.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "tessera.etcd.fullname" -}}
{{- printf "%s-etcd" (include "tessera.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "tessera.etcd.headless" -}}
{{- printf "%s-etcd-headless" (include "tessera.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Secret holding the public API's token file (key tokens.csv): the user's, or the one the
     chart makes (coordinator-auth-secret.yaml); empty when authentication is off. */}}
{{- define "tessera.authSecret" -}}
{{- if not .Values.coordinator.auth.allowUnauthenticated -}}
{{- default (printf "%s-tokens" (include "tessera.coordinator.fullname" .) | trunc 63 | trimSuffix "-") .Values.coordinator.auth.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* The claim holding the coordinator's state store: the existing one named, or the chart's;
empty when the store is off or is an S3 bucket. */}}
{{- define "tessera.stateClaim" -}}
{{- $s := .Values.coordinator.state -}}
{{- if and $s.enabled (not $s.url) -}}
{{- default (printf "%s-state" (include "tessera.coordinator.fullname" .) | trunc 63 | trimSuffix "-") $s.persistence.existingClaim -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount the pods run as. */}}
{{- define "tessera.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tessera.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference: call with (dict "root" $ "image" .Values.worker.image); the tag defaults to appVersion. */}}
{{- define "tessera.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* TESSERA_ETCD_ENDPOINTS: the bundled etcd's client Service, or the external endpoints. */}}
{{- define "tessera.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "tessera.etcd.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.etcd.clientPort) -}}
{{- else -}}
{{- if not .Values.etcd.external.endpoints -}}
{{- fail "etcd.external.endpoints: give at least one etcd URL when etcd.enabled is false" -}}
{{- end -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* terminationGracePeriodSeconds of the Tessera pods: the app's grace period plus the margin. */}}
{{- define "tessera.terminationGrace" -}}
{{- add .Values.config.gracePeriodSeconds .Values.config.terminationGraceMarginSeconds -}}
{{- end -}}

{{/* The pods' checksum/config annotation value for one component: the shared ConfigMap and the
     component's own. Call with (dict "root" $ "component" "worker"). */}}
{{- define "tessera.configChecksum" -}}
{{- $shared := include (print .root.Template.BasePath "/config-shared.yaml") .root -}}
{{- $own := include (print .root.Template.BasePath "/" .component "-config.yaml") .root -}}
{{- print $shared $own | sha256sum -}}
{{- end -}}

{{/* The gRPC probe fields of one probe: call with (dict "port" 50061 "probe" .Values.worker.probes.liveness). */}}
{{- define "tessera.grpcProbe" -}}
grpc:
  port: {{ .port }}
  service: ""
{{- with .probe }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A PodDisruptionBudget's budget: minAvailable when set, else maxUnavailable. Call with the
     podDisruptionBudget values. */}}
{{- define "tessera.pdbBudget" -}}
{{- if not (kindIs "invalid" .minAvailable) -}}
minAvailable: {{ .minAvailable }}
{{- else -}}
maxUnavailable: {{ .maxUnavailable }}
{{- end -}}
{{- end -}}
