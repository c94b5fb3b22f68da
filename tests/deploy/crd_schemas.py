"""JSON Schemas for the custom resources the chart renders, which kubernetes-validate lacks.

kubernetes-validate carries only the built-in kinds. The chart also renders a ServiceMonitor
(Prometheus Operator), a ScaledObject (KEDA) and an ExternalSecret (External Secrets Operator).
These schemas describe the parts of those resources the chart sets, with the field names and
types of each operator's API reference, and refuse unknown fields where the chart writes them,
so a typo in a template fails here rather than in a cluster.
"""

from __future__ import annotations

from typing import Any

_STRING = {"type": "string", "minLength": 1}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _LABELS},
    "required": ["matchLabels"],
    "additionalProperties": False,
}
_METADATA = {
    "type": "object",
    "properties": {"name": _STRING, "namespace": _STRING, "labels": _LABELS},
    "required": ["name"],
}
_DURATION = {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
    }


SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "properties": {
            "selector": _SELECTOR,
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "port": _STRING,
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                    },
                    "required": ["port"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
    },
)

_KAFKA_TRIGGER = {
    "type": "object",
    "properties": {
        "type": {"const": "kafka"},
        "metadata": {
            "type": "object",
            # KEDA reads every trigger metadata value as a string.
            "properties": {
                "bootstrapServers": _STRING,
                "consumerGroup": _STRING,
                "topic": _STRING,
                "lagThreshold": {"type": "string", "pattern": "^[1-9][0-9]*$"},
                "allowIdleConsumers": {"enum": ["true", "false"]},
            },
            "required": ["bootstrapServers", "consumerGroup", "lagThreshold"],
            "additionalProperties": False,
        },
    },
    "required": ["type", "metadata"],
    "additionalProperties": False,
}
_CPU_TRIGGER = {
    "type": "object",
    "properties": {
        "type": {"const": "cpu"},
        "metricType": {"enum": ["Utilization", "AverageValue"]},
        "metadata": {
            "type": "object",
            "properties": {"value": {"type": "string", "pattern": "^[1-9][0-9]*$"}},
            "required": ["value"],
            "additionalProperties": False,
        },
    },
    "required": ["type", "metricType", "metadata"],
    "additionalProperties": False,
}

SCALED_OBJECT = _resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    {
        "type": "object",
        "properties": {
            "scaleTargetRef": {
                "type": "object",
                "properties": {"name": _STRING, "kind": _STRING, "apiVersion": _STRING},
                "required": ["name"],
                "additionalProperties": False,
            },
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {"oneOf": [_KAFKA_TRIGGER, _CPU_TRIGGER]},
            },
        },
        "required": ["scaleTargetRef", "triggers"],
        "additionalProperties": False,
    },
)

EXTERNAL_SECRET = _resource(
    "external-secrets.io/v1",
    "ExternalSecret",
    {
        "type": "object",
        "properties": {
            "refreshInterval": _DURATION,
            "secretStoreRef": {
                "type": "object",
                "properties": {
                    "name": _STRING,
                    "kind": {"enum": ["SecretStore", "ClusterSecretStore"]},
                },
                "required": ["name"],
                "additionalProperties": False,
            },
            "target": {
                "type": "object",
                "properties": {
                    "name": _STRING,
                    "creationPolicy": {"enum": ["Owner", "Orphan", "Merge", "None"]},
                },
                "additionalProperties": False,
            },
            "data": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "secretKey": _STRING,
                        "remoteRef": {
                            "type": "object",
                            "properties": {"key": _STRING, "property": _STRING, "version": _STRING},
                            "required": ["key"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["secretKey", "remoteRef"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["secretStoreRef", "target", "data"],
        "additionalProperties": False,
    },
)

#: Schema of each custom resource kind, by (apiVersion, kind).
CUSTOM_RESOURCES: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("external-secrets.io/v1", "ExternalSecret"): EXTERNAL_SECRET,
}
