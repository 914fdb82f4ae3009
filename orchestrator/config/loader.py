"""Loading the config tree: YAML files, dotted overrides, readable validation errors, the schema listing."""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.errors import ConfigError
from orchestrator.config.pipeline import PipelineConfig


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_LIST_ITEM = re.compile(r"\[(\d+)\]")  # `sources[0].format` is spelled `sources.0.format` inside


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a','b','c'], value parsed as YAML, so 1e-4, true, [a, b] and null work).

    List items are addressed by index, as `a.sources.0.path=x` or `a.sources[0].path=x`.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = _LIST_ITEM.sub(r".\1", key.strip())
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Return a copy of `tree` with each dotted override set (list items by index: `a.sources.0.path=x`
    or `a.sources[0].path=x`)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = tree
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                node = node[_list_index(part, node, where)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: `{where}` is not a section")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(last, node, ".".join(path))] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {text!r}: `{'.'.join(path[:-1])}` is not a section")
    return tree


def _list_index(part: str, node: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"`{where}`: expected a list index below {len(node)}, got {part!r}")
    return int(part)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = err["loc"][:-1]
            allowed = _allowed_keys(parent)
            close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
            guess = f"; did you mean '{close[0]}'?" if close else ""
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  - {key}: unknown key{guess}{hint}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the section at `loc` (walking the model classes), for error messages."""
    model: Any = PipelineConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _section_type(field.annotation)
        if model is None:
            return []
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


def _section_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> PipelineConfig:
    """Load a YAML config file, apply dotted overrides and validate the result.

    Raises ConfigError naming the offending key and what is allowed.
    """
    tree = apply_overrides(_read_tree(path), overrides or [])
    return config_from_dict(tree, str(path) if path is not None else "overrides")


def load_config_for_models(path: Optional[str | os.PathLike], overrides: Optional[list[str]],
                           model_uri: str) -> PipelineConfig:
    """Load a config that evaluates given models (`orchestrator eval --model`): it needs no `model` or
    `tokenizer` section; without one, `model_uri` (which holds its own tokenizer) stands in as `model.base`."""
    tree = apply_overrides(_read_tree(path), overrides or [])
    if tree.get("model") is None:
        tree["model"] = {"base": model_uri}
    return config_from_dict(tree, str(path) if path is not None else "overrides")


def _read_tree(path: Optional[str | os.PathLike]) -> dict:
    if path is None:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
    return loaded


def config_from_dict(tree: dict, source: str = "dict") -> PipelineConfig:
    """Validate a plain dict as a PipelineConfig (used by load_config and by workers)."""
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def describe_schema(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[str]:
    """Every config key with its type, default and description, one line each (reference docs)."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_type(field.annotation)
        if sub is not None and sub is not model:
            lines.append(f"{key}: {field.description or ''}")
            lines.extend(describe_schema(sub, key + ("[]." if "list" in str(field.annotation) else ".")))
        else:
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"{key} (default {default}): {field.description or ''}")
    return lines
