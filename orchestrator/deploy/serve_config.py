"""A RayService's serveConfigV2, checked with Ray Serve's own config schema and this project's application.

Serve's schema (ServeDeploySchema) ignores unknown keys, and an `autoscaling_config` is a plain dict to it:
a misspelt `max_replica` would silently fall back to a default. Unknown keys are therefore found here against
the fields of Serve's own models, autoscaling configs are built as Serve builds them, and the application
is built offline from its `import_path` and `args`, as Serve's controller would, to learn its deployments.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.deploy.problems import Finding, PathPart
from orchestrator.errors import OrchestratorError


def serve_config_findings(text: Any, at: tuple[PathPart, ...], root: Path,
                          serve_port: Optional[int]) -> list[Finding]:
    """Findings for a serveConfigV2 string; `serve_port`: the head container's port named `serve`."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    try:
        config = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError as exc:
        return [Finding(at, f"not valid YAML: {exc}")]
    if not isinstance(config, dict):
        return [Finding(at, "expected a Ray Serve config (a mapping with `applications`)")]
    findings = unknown_fields(ServeDeploySchema, config, at)
    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return findings + [Finding(at + tuple(e["loc"]), e["msg"]) for e in exc.errors()]
    port = schema.http_options.port
    if serve_port is not None and port != serve_port:
        findings.append(Finding(at + ("http_options", "port"), f"{port}; the head's port named 'serve' is "
                                                                f"{serve_port}"))
    for app_index, app in enumerate(config.get("applications") or []):
        app_at = at + ("applications", app_index)
        deployment_names = _application_deployments(app, app_at, root, findings)
        for index, deployment in enumerate(app.get("deployments") or []):
            where = app_at + ("deployments", index)
            if deployment_names is not None and deployment.get("name") not in deployment_names:
                findings.append(Finding(where + ("name",), f"{deployment.get('name')!r} is not a deployment of "
                                                           f"{app.get('import_path')} ({', '.join(deployment_names)})"))
            autoscaling = deployment.get("autoscaling_config")
            if isinstance(autoscaling, dict):
                findings += _autoscaling_findings(autoscaling, where + ("autoscaling_config",), AutoscalingConfig)
    return findings


def _autoscaling_findings(autoscaling: dict[str, Any], at: tuple[PathPart, ...], model: type) -> list[Finding]:
    low, high = autoscaling.get("min_replicas", 1), autoscaling.get("max_replicas", 1)
    if isinstance(low, int) and isinstance(high, int) and low > high:
        return [Finding(at + ("min_replicas",), f"{low} is more than max_replicas {high}")]
    try:
        model(**autoscaling)
    except (ValidationError, TypeError, ValueError) as exc:
        errors = exc.errors() if isinstance(exc, ValidationError) else [{"loc": (), "msg": str(exc)}]
        return [Finding(at + tuple(e["loc"]), e["msg"]) for e in errors]
    return []


def _application_deployments(app: dict[str, Any], at: tuple[PathPart, ...], root: Path,
                             findings: list[Finding]) -> Optional[list[str]]:
    """Build the application as Serve's controller does (import_path + args), offline; its deployments' names.

    A relative `args.config` is read from the project root, the working directory of the image."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    args = dict(app.get("args") or {})
    if isinstance(args.get("config"), str):
        args["config"] = str(root / args["config"])
    try:
        builder = import_attr(app["import_path"])
        application = call_user_app_builder_with_args_if_necessary(builder, args)
        built = build_app(application, name=app.get("name", "default"))
    except (ImportError, AttributeError) as exc:
        findings.append(Finding(at + ("import_path",), f"cannot be imported: {exc}"))
        return None
    except (OrchestratorError, TypeError, ValueError, KeyError) as exc:
        findings.append(Finding(at + ("args",), f"the application cannot be built from these args: {exc}"))
        return None
    return [deployment.name for deployment in built.deployments]


def unknown_fields(model: type[BaseModel], value: Any, at: tuple[PathPart, ...]) -> list[Finding]:
    """Keys of `value` (recursively) that `model` and its nested models do not define."""
    if not isinstance(value, dict):
        return []
    fields = model.model_fields
    names = set(fields) | {f.alias for f in fields.values() if f.alias}
    findings = []
    for key, item in value.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            findings.append(Finding(at + (key,), "unknown field" + (f"; did you mean '{close[0]}'?" if close else "")))
            continue
        nested = _nested_model(fields[key].annotation) if key in fields else None
        if nested is None:
            continue
        if isinstance(item, list):
            for index, element in enumerate(item):
                findings += unknown_fields(nested, element, at + (key, index))
        else:
            findings += unknown_fields(nested, item, at + (key,))
    return findings


def _nested_model(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model inside an annotation such as Optional[Union[Dict, AutoscalingConfig]] or List[X]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _nested_model(argument)
        if found is not None:
            return found
    return None
