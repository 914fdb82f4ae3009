"""The image's facts the manifests depend on, read from the Dockerfile: the pinned Ray, working directory, user."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.deploy.problems import Problem

_RAY_INSTALL = re.compile(r"""["']?ray(\[[^\]]*\])?==\$\{?RAY_VERSION\}?""")


@dataclass(frozen=True)
class ImageFacts:
    ray_version: Optional[str]      # ARG RAY_VERSION=...
    ray_version_line: Optional[int]
    installs_pinned_ray: bool       # a RUN installs ray==${RAY_VERSION}
    workdir: Optional[str]          # the last WORKDIR: where `python jobs/...` entrypoints run
    user: Optional[str]             # the last USER
    user_line: Optional[int]


def read_dockerfile(path: Path) -> ImageFacts:
    """The facts of a Dockerfile (instructions joined across line continuations)."""
    ray_version = ray_line = workdir = user = user_line = None
    installs = False
    for line_no, instruction, argument in _instructions(path.read_text(encoding="utf-8")):
        if instruction == "ARG" and argument.startswith("RAY_VERSION="):
            ray_version, ray_line = argument.split("=", 1)[1].strip().strip("\"'"), line_no
        elif instruction == "RUN" and _RAY_INSTALL.search(argument):
            installs = True
        elif instruction == "WORKDIR":
            workdir = argument.strip()
        elif instruction == "USER":
            user, user_line = argument.strip(), line_no
    return ImageFacts(ray_version, ray_line, installs, workdir, user, user_line)


def _instructions(text: str) -> list[tuple[int, str, str]]:
    """(first line, INSTRUCTION, argument) for each Dockerfile instruction."""
    result, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = number
        if line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instruction, _, argument = full.partition(" ")
        result.append((start, instruction.upper(), argument.strip()))
    return result


def image_problems(dockerfile: Path, pyproject: Path, ray_version: str) -> list[Problem]:
    """The Dockerfile pins the installed Ray (which pyproject.toml allows) and does not run as root."""
    import tomllib

    from packaging.requirements import Requirement

    problems = []
    facts = read_dockerfile(dockerfile)
    source = str(dockerfile)
    if facts.ray_version is None:
        problems.append(Problem(source, (), f"no ARG RAY_VERSION: pin Ray with ARG RAY_VERSION={ray_version}"))
    elif facts.ray_version != ray_version:
        problems.append(Problem(source, (), f"ARG RAY_VERSION={facts.ray_version} is not the Ray this project "
                                f"runs ({ray_version}, installed and allowed by pyproject.toml)",
                                line=facts.ray_version_line))
    if not facts.installs_pinned_ray:
        problems.append(Problem(source, (), 'no RUN installs "ray[...]==${RAY_VERSION}"'))
    if facts.user is None or facts.user.split(":")[0] in ("0", "root"):
        problems.append(Problem(source, (), "the image runs as root: end with USER <uid> of a non-root "
                                "user (the pods set runAsNonRoot)", line=facts.user_line))
    with open(pyproject, "rb") as handle:
        dependencies = tomllib.load(handle).get("project", {}).get("dependencies", [])
    ray_requirements = [Requirement(d) for d in dependencies if Requirement(d).name == "ray"]
    if not ray_requirements:
        problems.append(Problem(str(pyproject), ("project", "dependencies"), "no ray requirement"))
    for requirement in ray_requirements:
        if not requirement.specifier.contains(ray_version):
            problems.append(Problem(str(pyproject), ("project", "dependencies"), f"'{requirement}' does not allow "
                                    f"the installed Ray {ray_version}"))
    return problems
