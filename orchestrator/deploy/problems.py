"""What every deployment check returns: problems that name the file, line, resource and field."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import yaml

PathPart = str | int
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Finding:
    """A check's result inside one document: the field (as path parts) and what is wrong with it."""

    parts: tuple[PathPart, ...]
    message: str


@dataclass(frozen=True)
class Problem:
    """A finding placed: file or overlay, line when known, resource (Kind/name), field path."""

    source: str
    parts: tuple[PathPart, ...]
    message: str
    resource: str = ""
    line: Optional[int] = None

    @property
    def path(self) -> str:
        return field_path(self.parts)

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        what = " ".join(part for part in (self.resource, self.path) if part)
        return f"{where}: {what}: {self.message}" if what else f"{where}: {self.message}"


def field_path(parts: Sequence[PathPart]) -> str:
    """("spec", "containers", 0, "limits", "nvidia.com/gpu") -> spec.containers[0].limits["nvidia.com/gpu"]."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            text += f".{part}" if text else part
        else:
            text += f'["{part}"]'
    return text


def yaml_documents(text: str) -> list[tuple[Any, yaml.Node]]:
    """Each non-empty YAML document as (plain data, node tree with line marks); raises yaml.YAMLError."""
    documents = []
    for node in yaml.compose_all(text, Loader=yaml.SafeLoader):
        if node is None:
            continue
        loader = yaml.SafeLoader("")
        documents.append((loader.construct_document(node), node))
    return documents


def line_of(node: Optional[yaml.Node], parts: Sequence[PathPart]) -> Optional[int]:
    """1-based line of the field at `parts` in a composed YAML document (or of its deepest existing parent)."""
    if node is None:
        return None
    for part in parts:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((value for key, value in node.value if getattr(key, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node = child
    return node.start_mark.line + 1


def place(findings: Sequence[Finding], source: str, resource: str = "",
          node: Optional[yaml.Node] = None) -> list[Problem]:
    """Findings of one document as problems of `source`, with lines when the document's node tree is given."""
    return [Problem(source, f.parts, f.message, resource, line_of(node, f.parts)) for f in findings]
