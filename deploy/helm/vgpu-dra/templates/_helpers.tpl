{{/* Names and labels shared by the templates. */}}

{{- define "vgpu-dra.plugin" -}}vgpu-kubelet-plugin{{- end }}
{{- define "vgpu-dra.controller" -}}vgpu-controller{{- end }}

{{- define "vgpu-dra.labels" -}}
app.kubernetes.io/part-of: vgpu-dra
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vgpu-dra.pluginSelector" -}}
app.kubernetes.io/name: {{ include "vgpu-dra.plugin" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vgpu-dra.controllerSelector" -}}
app.kubernetes.io/name: {{ include "vgpu-dra.controller" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The resource.k8s.io version the cluster serves for DeviceClasses. */}}
{{- define "vgpu-dra.resourceApiVersion" -}}
{{- if .Values.resourceApiVersion -}}
{{ .Values.resourceApiVersion }}
{{- else if semverCompare ">=1.34-0" .Capabilities.KubeVersion.Version -}}
resource.k8s.io/v1
{{- else -}}
resource.k8s.io/v1beta1
{{- end -}}
{{- end }}

{{- define "vgpu-dra.image" -}}
{{ .image.repository }}:{{ .image.tag | default .appVersion }}
{{- end }}

{{/* The plugin's directory, its socket and checkpoint, under the kubelet's. */}}
{{- define "vgpu-dra.pluginDir" -}}
{{ trimSuffix "/" .Values.host.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end }}
