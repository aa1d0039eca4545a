{{/* Names and labels. */}}
{{- define "layrot.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "layrot.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "layrot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "layrot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "layrot.labels" -}}
{{ include "layrot.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: layrot
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* PostgreSQL is used when a URL or a Secret holding one is given. */}}
{{- define "layrot.postgres" -}}
{{- if or .Values.postgresql.url .Values.postgresql.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "layrot.dbSecretName" -}}
{{- .Values.postgresql.existingSecret | default (printf "%s-db" (include "layrot.fullname" .)) -}}
{{- end -}}

{{- define "layrot.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "layrot.fullname" .)) -}}
{{- end -}}

{{- define "layrot.hasAuth" -}}
{{- if or .Values.auth.token .Values.auth.readToken .Values.auth.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* The pod template shared by the StatefulSet (SQLite) and the Deployment (PostgreSQL). */}}
{{- define "layrot.podTemplate" -}}
metadata:
  labels:
    {{- include "layrot.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/part-of: layrot
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # Restart the pods when the chart's own Secrets change.
    checksum/secrets: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: collector
      image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      # serve listens on 127.0.0.1 by default, unreachable from the Service.
      args:
        - serve
        - --grpc-host
        - 0.0.0.0
        - --metrics-host
        - 0.0.0.0
        - --grpc-port
        - {{ .Values.service.grpcPort | quote }}
        - --metrics-port
        - {{ .Values.service.httpPort | quote }}
        {{- if not (include "layrot.postgres" .) }}
        - --db
        - /var/lib/layrot/history.db
        {{- end }}
        {{- if .Values.tls.enabled }}
        - --tls-cert
        - /etc/layrot/tls/tls.crt
        - --tls-key
        - /etc/layrot/tls/tls.key
        {{- if .Values.tls.clientCaKey }}
        - --tls-client-ca
        - /etc/layrot/tls/{{ .Values.tls.clientCaKey }}
        {{- end }}
        {{- end }}
        {{- range .Values.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      {{- if or (include "layrot.postgres" .) (include "layrot.hasAuth" .) .Values.extraEnv }}
      env:
        {{- end }}
        {{- if include "layrot.postgres" . }}
        # serve reads --db from LAYROT_DB: the URL stays in the Secret and out of the process list.
        - name: LAYROT_DB
          valueFrom:
            secretKeyRef:
              name: {{ include "layrot.dbSecretName" . }}
              key: {{ .Values.postgresql.existingSecretKey }}
        # Replicas share the database (server/cluster.py): each pod is one collector, named after itself.
        - name: LAYROT_COLLECTOR_ID
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- end }}
        {{- if include "layrot.hasAuth" . }}
        - name: LAYROT_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ include "layrot.authSecretName" . }}
              key: {{ .Values.auth.tokenKey }}
              optional: true
        - name: LAYROT_READ_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ include "layrot.authSecretName" . }}
              key: {{ .Values.auth.readTokenKey }}
              optional: true
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ .Values.service.grpcPort }}
          protocol: TCP
        - name: http
          containerPort: {{ .Values.service.httpPort }}
          protocol: TCP
      # Ready = the gRPC health service (grpc.health.v1, service "") says SERVING, which the
      # collector sets once ingest and queries are served. The kubelet's gRPC probe speaks
      # no TLS: with TLS it asks /readyz over HTTPS instead, and with mutual TLS (the
      # kubelet has no client certificate) it can only check that the port accepts.
      readinessProbe:
        {{- if not .Values.tls.enabled }}
        grpc:
          port: {{ .Values.service.grpcPort }}
        {{- else if not .Values.tls.clientCaKey }}
        httpGet:
          path: /readyz
          port: http
          scheme: HTTPS
        {{- else }}
        tcpSocket:
          port: grpc
        {{- end }}
        {{- toYaml .Values.probes.readiness | nindent 8 }}
      livenessProbe:
        {{- if not .Values.tls.clientCaKey }}
        httpGet:
          path: /healthz
          port: http
          scheme: {{ ternary "HTTPS" "HTTP" .Values.tls.enabled }}
        {{- else }}
        tcpSocket:
          port: http
        {{- end }}
        {{- toYaml .Values.probes.liveness | nindent 8 }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- if not (include "layrot.postgres" .) }}
        - name: data
          mountPath: /var/lib/layrot
        {{- end }}
        {{- if .Values.tls.enabled }}
        - name: tls
          mountPath: /etc/layrot/tls
          readOnly: true
        {{- end }}
        # serve writes nothing else, but Python and gRPC may want a writable /tmp.
        - name: tmp
          mountPath: /tmp
  volumes:
    {{- if .Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ required "tls.secretName is required with tls.enabled" .Values.tls.secretName }}
    {{- end }}
    - name: tmp
      emptyDir: {}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
