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

{{/* TESSERA_ETCD_ENDPOINTS: the bundled etcd's client Service (https with tls on), or the
     external endpoints. */}}
{{- define "tessera.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- printf "%s://%s.%s.svc.%s:%d" (include "tessera.etcdScheme" .) (include "tessera.etcd.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.etcd.clientPort) -}}
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

{{/* Who issues the release's TLS certificates: "helm" or "certManager"; empty when tls is off.
     issuer auto takes cert-manager when its API is installed. */}}
{{- define "tessera.tlsIssuer" -}}
{{- $t := .Values.tls -}}
{{- if $t.enabled -}}
{{- if ne $t.issuer "auto" -}}
{{- $t.issuer -}}
{{- else if .Capabilities.APIVersions.Has "cert-manager.io/v1" -}}
certManager
{{- else -}}
helm
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The bundled etcd's URL scheme: https when the release runs TLS. */}}
{{- define "tessera.etcdScheme" -}}
{{- if include "tessera.tlsIssuer" . -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* The components that get a TLS certificate: the coordinator, the workers, and the bundled etcd. */}}
{{- define "tessera.tlsComponents" -}}
{{- if .Values.etcd.enabled -}}coordinator,worker,etcd{{- else -}}coordinator,worker{{- end -}}
{{- end -}}

{{/* The Secret holding one component's certificate (ca.crt, tls.crt, tls.key): call with
     (dict "root" $ "component" "worker"). */}}
{{- define "tessera.tlsSecret" -}}
{{- printf "%s-%s-tls" (include "tessera.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Secret holding the CA the chart made (issuer helm: its key signs certificates on upgrades). */}}
{{- define "tessera.tlsCaSecret" -}}
{{- printf "%s-tls-ca" (include "tessera.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The DNS names one component's certificate is for, comma-separated: call with (dict "root" $
     "component" "worker"). Workers: every pod's name under the headless Service (what the
     coordinator and the other ranks dial); etcd: its client Service and every member's peer
     name, and localhost; the coordinator: its Service. */}}
{{- define "tessera.tlsDnsNames" -}}
{{- $r := .root -}}
{{- $svc := printf "%s.svc" $r.Release.Namespace -}}
{{- $fqdn := printf "%s.svc.%s" $r.Release.Namespace $r.Values.clusterDomain -}}
{{- if eq .component "worker" -}}
{{- $h := include "tessera.worker.headless" $r -}}
{{- printf "*.%s.%s,*.%s.%s" $h $fqdn $h $svc -}}
{{- else if eq .component "etcd" -}}
{{- $n := include "tessera.etcd.fullname" $r -}}
{{- $h := include "tessera.etcd.headless" $r -}}
{{- printf "%s,%s.%s,%s.%s,%s.%s,*.%s.%s,*.%s.%s,localhost" $n $n $r.Release.Namespace $n $svc $n $fqdn $h $fqdn $h $svc -}}
{{- else -}}
{{- $n := include "tessera.coordinator.fullname" $r -}}
{{- printf "%s,%s.%s,%s.%s,%s.%s" $n $n $r.Release.Namespace $n $svc $n $fqdn -}}
{{- end -}}
{{- end -}}

{{/* Where a component's certificate is mounted. */}}
{{- define "tessera.tlsDir" -}}/etc/tessera/tls{{- end -}}

{{/* A container's TLS env entries (call with (dict "root" $ "component" "worker")): its
     certificate for the internal API and, with the bundled etcd, as etcd's client. Empty when
     tls is off. */}}
{{- define "tessera.tlsEnv" -}}
{{- if include "tessera.tlsIssuer" .root -}}
{{- $d := include "tessera.tlsDir" . -}}
- name: TESSERA_TLS_CERT
  value: {{ $d }}/tls.crt
- name: TESSERA_TLS_KEY
  value: {{ $d }}/tls.key
- name: TESSERA_TLS_CA
  value: {{ $d }}/ca.crt
{{- if .root.Values.etcd.enabled }}
- name: TESSERA_ETCD_CA
  value: {{ $d }}/ca.crt
- name: TESSERA_ETCD_CERT
  value: {{ $d }}/tls.crt
- name: TESSERA_ETCD_KEY
  value: {{ $d }}/tls.key
{{- end }}
{{- end -}}
{{- end -}}

{{/* A container's mount of its certificate; empty when tls is off. */}}
{{- define "tessera.tlsMount" -}}
{{- if include "tessera.tlsIssuer" .root -}}
- name: tls
  mountPath: {{ include "tessera.tlsDir" . }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* A pod's volume of its component's certificate Secret; empty when tls is off. */}}
{{- define "tessera.tlsVolume" -}}
{{- if include "tessera.tlsIssuer" .root -}}
- name: tls
  secret:
    secretName: {{ include "tessera.tlsSecret" . }}
    defaultMode: 0440
{{- end -}}
{{- end -}}

{{/* A worker probe: gRPC health on the internal port, or, with tls on (that port then asks for
     a client certificate), an HTTP GET of `path` on the metrics port. Call with (dict "root" $
     "path" "/readyz" "probe" .Values.worker.probes.startup). */}}
{{- define "tessera.workerProbe" -}}
{{- if include "tessera.tlsIssuer" .root -}}
httpGet:
  path: {{ .path }}
  port: metrics
{{- with .probe }}
{{ toYaml . }}
{{- end }}
{{- else -}}
{{- include "tessera.grpcProbe" (dict "port" .root.Values.worker.ports.grpc "probe" .probe) -}}
{{- end -}}
{{- end -}}
