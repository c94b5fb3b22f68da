{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "quantmesh.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* chart label value: name-version. */}}
{{- define "quantmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource name of one stage: <release>-<stage>, or <stage> when the release is the chart name. */}}
{{- define "quantmesh.stageName" -}}
{{- $root := index . 0 -}}
{{- $stage := index . 1 -}}
{{- if eq $root.Release.Name (include "quantmesh.name" $root) -}}
{{- $stage | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" $root.Release.Name $stage | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one stage (immutable on a Deployment: keep them minimal). */}}
{{- define "quantmesh.selectorLabels" -}}
{{- $root := index . 0 -}}
{{- $stage := index . 1 -}}
app.kubernetes.io/name: {{ include "quantmesh.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ $stage }}
{{- end -}}

{{/* All labels of one stage. */}}
{{- define "quantmesh.labels" -}}
{{- $root := index . 0 -}}
{{ include "quantmesh.selectorLabels" . }}
app.kubernetes.io/part-of: quantmesh
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
helm.sh/chart: {{ include "quantmesh.chart" $root }}
{{- end -}}

{{/* Image reference of one stage: its own image block, else <registry>/quantmesh-<stage>:<tag>. */}}
{{- define "quantmesh.image" -}}
{{- $root := index . 0 -}}
{{- $stage := index . 1 -}}
{{- $svc := index . 2 -}}
{{- $img := $svc.image | default dict -}}
{{- $repo := $img.repository | default (printf "%s/quantmesh-%s" $root.Values.image.registry $stage) -}}
{{- $tag := $img.tag | default $root.Values.image.tag | default $root.Chart.AppVersion -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
