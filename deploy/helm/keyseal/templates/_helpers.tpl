{{/* Names and labels shared by every template. */}}
{{- define "keyseal.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keyseal.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The server's pods only (the agents' pods share the selector labels above). */}}
{{- define "keyseal.serverPodLabels" -}}
{{ include "keyseal.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "keyseal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyseal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keyseal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "keyseal.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keyseal
{{- end -}}

{{- define "keyseal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "keyseal.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Whether the pod needs the local KEK Secret. */}}
{{- define "keyseal.localKek" -}}
{{- if and (eq .Values.custody "wrapped") (eq .Values.keyWrapping.provider "local") -}}true{{- end -}}
{{- end -}}

{{- define "keyseal.kekSecretName" -}}
{{- default (printf "%s-kek" (include "keyseal.fullname" .)) .Values.localKek.existingSecret -}}
{{- end -}}

{{/* Where the PKCS#11 PIN Secret's key is mounted (read-only, 0400): the server's pkcs11.pinFile. */}}
{{- define "keyseal.pkcs11PinDir" -}}/var/run/keyseal/pkcs11{{- end -}}

{{- define "keyseal.pkcs11PinFile" -}}
{{- printf "%s/pin" (include "keyseal.pkcs11PinDir" .) -}}
{{- end -}}

{{/* The server configuration: the server's sections of the values, with what the cluster decides filled in. */}}
{{- define "keyseal.config" -}}
{{- $store := deepCopy .Values.store -}}
{{- $_ := set $store.kubernetes "namespace" (default .Release.Namespace .Values.store.kubernetes.namespace) -}}
{{- $server := deepCopy .Values.server -}}
{{- if .Values.tls.existingSecret -}}
{{- $_ := set $server.tls "certFile" "/etc/keyseal/tls/tls.crt" -}}
{{- $_ := set $server.tls "keyFile" "/etc/keyseal/tls/tls.key" -}}
{{- end -}}
{{- if not $server.tls.selfIssued.dnsNames -}}
{{- $svc := include "keyseal.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $_ := set $server.tls.selfIssued "dnsNames" (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) "localhost") -}}
{{- $_ := set $server.tls.selfIssued "ipAddresses" (default (list "127.0.0.1") $server.tls.selfIssued.ipAddresses) -}}
{{- end -}}
{{- $pkcs11 := dict "uri" .Values.pkcs11.uri "modulePath" .Values.pkcs11.modulePath "labelPrefix" .Values.pkcs11.labelPrefix -}}
{{- if .Values.pkcs11.pinSecret.name -}}
{{- $_ := set $pkcs11 "pinFile" (include "keyseal.pkcs11PinFile" .) -}}
{{- end -}}
{{- $config := dict "trustDomain" .Values.trustDomain "custody" .Values.custody "keyWrapping" .Values.keyWrapping "aws" .Values.aws "vault" .Values.vault "pkcs11" $pkcs11 "store" $store "ca" .Values.ca "x509SVID" .Values.x509SVID "jwtSVID" .Values.jwtSVID "bundle" .Values.bundle "agents" .Values.agents "server" $server "clients" .Values.clients "logLevel" .Values.logLevel -}}
{{- if include "keyseal.k8sIdentity" . -}}
{{- $k8s := .Values.agent.kubernetes -}}
{{- $nodes := dict "enabled" true "audience" $k8s.audience "serviceAccounts" (list (printf "%s/%s" .Release.Namespace (include "keyseal.agentServiceAccountName" .))) -}}
{{- $templates := dict "enabled" (eq .Values.store.type "kubernetes") "interval" $k8s.templateInterval -}}
{{- $_ := set $config "kubernetes" (dict "cluster" $k8s.cluster "nodeAttestation" $nodes "identityTemplates" $templates) -}}
{{- end -}}
{{- if .Values.oidc.enabled -}}
{{- $_ := set $config "oidc" (dict "listen" .Values.oidc.listen "tls" (include "keyseal.listenerTls" (dict "tls" .Values.oidc.tls "dir" "/etc/keyseal/oidc-tls") | fromYaml)) -}}
{{- end -}}
{{- if .Values.federation.enabled -}}
{{- $federation := dict "listen" .Values.federation.listen "trustDomains" .Values.federation.trustDomains -}}
{{- $tls := include "keyseal.listenerTls" (dict "tls" .Values.federation.tls "dir" "/etc/keyseal/federation-tls") | fromYaml -}}
{{- if $tls.certFile -}}
{{- $_ := set $federation "tls" $tls -}}
{{- end -}}
{{- $_ := set $config "federation" $federation -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The ConfigMap the server keeps the trust bundle in, for the agents' first contact. */}}
{{- define "keyseal.agentBundleConfigMap" -}}
{{ include "keyseal.fullname" . }}-agent-bundle
{{- end }}

{{/* The ConfigMap of the keyset pins (custody kms or pkcs11 on the Kubernetes store): <recordPrefix>-keyset-pins,
the server's default record prefix being keyseal-<trustDomain> ('_' made '-'; set store.recordPrefix for a trust
domain longer than 100 characters). */}}
{{- define "keyseal.keysetPinsConfigMap" -}}
{{ .Values.store.recordPrefix | default (printf "keyseal-%s" (.Values.trustDomain | replace "_" "-")) }}-keyset-pins
{{- end }}

{{/* Kubernetes-native identity (#17): agents join with projected service account tokens, pods are attested by the
kubelet, entries come from IdentityTemplates. "true" or empty. */}}
{{- define "keyseal.k8sIdentity" -}}
{{- if and .Values.agent.enabled .Values.agent.kubernetes.enabled -}}true{{- end -}}
{{- end }}

{{/* The agents' service account: the only one the server lets join with a service account token. */}}
{{- define "keyseal.agentServiceAccountName" -}}
{{ include "keyseal.fullname" . }}-agent
{{- end }}

{{/* certFile/keyFile of a side listener (oidc, federation): the mounted existingSecret, else the values'. */}}
{{- define "keyseal.listenerTls" -}}
{{- if .tls.existingSecret -}}
certFile: {{ printf "%s/tls.crt" .dir }}
keyFile: {{ printf "%s/tls.key" .dir }}
{{- else if .tls.certFile -}}
certFile: {{ .tls.certFile }}
keyFile: {{ .tls.keyFile }}
{{- else -}}
{}
{{- end -}}
{{- end }}

{{/* The server's record prefix (store.recordPrefix, else keyseal-<trustDomain>, '_' made '-'): its own
ConfigMaps on the Kubernetes store are named after it. */}}
{{- define "keyseal.recordPrefix" -}}
{{ .Values.store.recordPrefix | default (printf "keyseal-%s" (.Values.trustDomain | replace "_" "-")) }}
{{- end }}
