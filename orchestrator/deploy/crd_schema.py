"""Custom resources checked against their CustomResourceDefinitions, as the Kubernetes API server would.

The API server (with strict field validation, `kubectl apply`'s default) rejects unknown fields, treats a
required field that has a default as optional, drops nulls before validating, enforces the uniqueness of
list-map keys and knows the shape of `metadata`. The CRD's `openAPIV3Schema` is adapted to say the same in
JSON Schema. Not evaluated: the CEL rules (`x-kubernetes-validations`); in the KubeRay v1.7.0 CRDs they
concern only `managedBy`, `deletionStrategy` and `gcsFaultToleranceOptions`, which these manifests leave unset.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import jsonschema
import yaml

from orchestrator.deploy.problems import Finding
from orchestrator.errors import DeploymentError

_QUANTITY_HINT = "a Kubernetes quantity such as 8, 500m or 64Gi"

# ObjectMeta fields a manifest may set (the API server validates `metadata` itself; the CRD says only "object").
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


@dataclass(frozen=True)
class CrdSchemas:
    """Structural schemas by (apiVersion, kind), e.g. ("ray.io/v1", "RayJob")."""

    by_resource: dict[tuple[str, str], dict[str, Any]]
    groups: frozenset[str]

    def schema_for(self, api_version: str, kind: str) -> Optional[dict[str, Any]]:
        return self.by_resource.get((api_version, kind))

    def covers(self, api_version: str) -> bool:
        """True when `api_version`'s group is defined by these CRDs (so an unknown kind in it is an error)."""
        return api_version.split("/", 1)[0] in self.groups


@functools.lru_cache(maxsize=4)
def load_crd_schemas(crds_dir: str) -> CrdSchemas:
    """Every served version of every CRD in `crds_dir` (*.yaml), adapted as the API server validates."""
    directory = Path(crds_dir)
    files = sorted(directory.glob("*.yaml")) if directory.is_dir() else []
    if not files:
        raise DeploymentError(f"no CRD files (*.yaml) in {crds_dir}: point --crds at the KubeRay CRDs, "
                              "e.g. ../shared/kuberay-v1.7.0/crds")
    by_resource, groups = {}, set()
    for path in files:
        with open(path, encoding="utf-8") as handle:
            documents = list(yaml.load_all(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
        for crd in documents:
            if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            groups.add(spec["group"])
            for version in spec["versions"]:
                if version.get("served"):
                    schema = structural(version["schema"]["openAPIV3Schema"])
                    schema.setdefault("properties", {})["metadata"] = OBJECT_META
                    schema["properties"]["apiVersion"] = {"type": "string"}
                    schema["properties"]["kind"] = {"type": "string"}
                    by_resource[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = schema
    if not by_resource:
        raise DeploymentError(f"{crds_dir}: no CustomResourceDefinition with a served version found")
    return CrdSchemas(by_resource, frozenset(groups))


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of an openAPIV3Schema in which objects reject unknown fields unless the CRD preserves them,
    and fields with a default are not required."""
    schema = copy.deepcopy(schema)

    def adapt(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                adapt(item)
            return
        if not isinstance(node, dict):
            return
        properties = node.get("properties")
        if isinstance(properties, dict):
            if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            if "required" in node:
                node["required"] = [name for name in node["required"] if "default" not in properties.get(name, {})]
        for key, child in node.items():
            if key != "default":
                adapt(child)

    adapt(schema)
    return schema


def _unique_list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict) -> Iterator[Any]:
    """x-kubernetes-list-map-keys: entries of a list-map must differ in their keys (e.g. env var names)."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k) for k in keys)
        if key in seen:
            shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key))
            yield jsonschema.ValidationError(f"duplicate entry {shown}")
        seen.add(key)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _unique_list_map_keys}
)


def drop_nulls(value: Any) -> Any:
    """The resource without null-valued fields (the API server prunes them before validating)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def crd_findings(resource: dict[str, Any], schema: dict[str, Any]) -> list[Finding]:
    """Everything in `resource` the API server would reject under `schema`, one finding per field."""
    validator = _Validator(schema)
    findings = []
    for error in validator.iter_errors(drop_nulls(resource)):
        findings.extend(explain_schema_error(error))
    return sorted(set(findings), key=lambda f: (json.dumps(f.parts, default=str), f.message))


def explain_schema_error(error: jsonschema.ValidationError) -> list[Finding]:
    """A JSON-schema error as findings that name the field and say what was expected."""
    parts = tuple(error.absolute_path)
    keyword, schema, instance = error.validator, error.schema, error.instance
    if keyword == "additionalProperties" and isinstance(instance, dict):
        allowed = sorted(schema.get("properties", {}))
        findings = []
        for name in sorted(set(instance) - set(allowed)):
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else (
                f" (allowed: {', '.join(allowed)})" if len(allowed) <= 12 else "")
            findings.append(Finding(parts + (name,), f"unknown field{hint}"))
        return findings
    if keyword == "required":
        missing = [name for name in error.validator_value if name not in instance]
        return [Finding(parts + (name,), "required field is missing") for name in missing]
    if keyword == "pattern" and schema.get("x-kubernetes-int-or-string"):
        return [Finding(parts, f"expected {_QUANTITY_HINT}, got {instance!r}")]
    if keyword == "anyOf" and schema.get("x-kubernetes-int-or-string"):
        return [Finding(parts, f"expected an integer or a string ({_QUANTITY_HINT}), got {instance!r}")]
    if keyword == "type":
        return [Finding(parts, f"expected {_type_words(error.validator_value)}, got {_json_type(instance)} "
                               f"{_short(instance)}")]
    if keyword == "enum":
        allowed = ", ".join(repr(v) for v in error.validator_value)
        return [Finding(parts, f"expected one of {allowed}, got {_short(instance)}")]
    return [Finding(parts, error.message)]


def _type_words(expected: Any) -> str:
    names = expected if isinstance(expected, list) else [expected]
    words = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
             "number": "a number", "boolean": "true or false"}
    return " or ".join(words.get(n, n) for n in names)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {dict: "mapping", list: "list", str: "string", int: "integer", float: "number"}.get(type(value), "value")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
