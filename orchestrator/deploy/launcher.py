"""Ray cluster-launcher YAML (`ray up`) checked offline, the way `ray up` checks it before touching a cloud.

`ray up` runs `prepare_config` (merge the provider's defaults.yaml, fill per-node-type worker bounds, check
the docker section) and `validate_config` (ray/autoscaler/ray-schema.json plus cross-field rules) and only
then bootstraps the provider (IAM roles, key pairs, networks: the part that needs cloud credentials). The
first two run here, unchanged; the file itself is also checked against the schema before the defaults are
merged, so a misspelt key is reported at its own line. This project adds: per-node-type min_workers <=
max_workers, and the cluster runs the pinned Ray (the project's image, or setup commands pinning it).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from orchestrator.deploy.crd_schema import explain_schema_error
from orchestrator.deploy.problems import Finding, Problem, place, yaml_documents

_RAY_PIN = re.compile(r"""\bray(\[[^\]]*\])?==([0-9][\w.]*)""")
_NIGHTLY = "ray-wheels/latest"


def launcher_schema() -> dict[str, Any]:
    """The cluster-launcher schema shipped in the installed Ray wheel."""
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json", encoding="utf-8") as handle:
        return json.load(handle)


def cluster_config_problems(path: Path, ray_version: str) -> list[Problem]:
    """Everything `ray up` would refuse in `path` before contacting the provider, plus the Ray pin."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    source = str(path)
    try:
        documents = yaml_documents(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        return [Problem(source, (), f"cannot be read as YAML: {exc}")]
    if len(documents) != 1 or not isinstance(documents[0][0], dict):
        return [Problem(source, (), "expected one YAML mapping (a cluster config)")]
    config, node = documents[0]
    findings = [f for error in jsonschema.Draft7Validator(launcher_schema()).iter_errors(config)
                for f in explain_schema_error(error)]
    if findings:
        return place(findings, source, node=node)
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        return place(explain_schema_error(exc), source, node=node)
    except Exception as exc:  # noqa: BLE001 - Ray raises ValueError, RuntimeError, click's exceptions, asserts
        return [Problem(source, (), f"Ray's prepare_config/validate_config refuse it: {type(exc).__name__}: {exc}")]
    return place(_semantic_findings(config, prepared, ray_version), source, node=node)


def _semantic_findings(config: dict[str, Any], prepared: dict[str, Any], ray_version: str) -> list[Finding]:
    findings = []
    for name, node_type in prepared.get("available_node_types", {}).items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if low > high:
            findings.append(Finding(("available_node_types", name, "min_workers"),
                                    f"{low} is more than max_workers {high}"))
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for index, command in enumerate(prepared.get(key) or []):
            where = (key, index) if key in config else (key,)
            for match in _RAY_PIN.finditer(command):
                if match.group(2) != ray_version:
                    findings.append(Finding(where, f"installs ray=={match.group(2)}; the project pins {ray_version}"))
            if _NIGHTLY in command:
                findings.append(Finding(where, f"installs Ray nightly (Ray's default for {key}): set {key} "
                                               "explicitly"))
    docker = prepared.get("docker") or {}
    commands = " ".join(c for k in ("setup_commands", "head_setup_commands") for c in prepared.get(k) or [])
    if not docker.get("image") and not _RAY_PIN.search(commands):
        findings.append(Finding(("docker",), f"no docker image and no setup command pinning ray=={ray_version}: "
                                             "the nodes would run whatever Ray they have"))
    return findings
