"""`orchestrator k8s validate` and `orchestrator cluster validate`: every deployment file checked offline.

k8s: each kustomize overlay is built (`kubectl kustomize`, offline), or a manifest file read as it is; every
KubeRay resource is validated against the KubeRay CRDs (crd_schema) and by the semantic checks (kuberay,
serve_config); the Dockerfile's Ray pin is checked against pyproject.toml and the installed Ray (image).
cluster: each cluster-launcher YAML goes through Ray's own checks (launcher).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from orchestrator.deploy.crd_schema import CrdSchemas, crd_findings, load_crd_schemas
from orchestrator.deploy.image import image_problems, read_dockerfile
from orchestrator.deploy.kuberay import ProjectFacts, resource_findings
from orchestrator.deploy.launcher import cluster_config_problems
from orchestrator.deploy.problems import Problem, place, yaml_documents
from orchestrator.errors import DeploymentError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CRDS = PROJECT_ROOT.parent / "shared" / "kuberay-v1.7.0" / "crds"


@dataclass
class Report:
    """What was checked and what is wrong."""

    problems: list[Problem] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)   # "source: Kind/name" of every validated resource
    unchecked: list[str] = field(default_factory=list)  # resources no schema here covers (core kinds)

    @property
    def ok(self) -> bool:
        return not self.problems


def project_facts(root: Path = PROJECT_ROOT) -> ProjectFacts:
    """The installed Ray and the Dockerfile's facts, which every manifest must agree with."""
    import ray

    dockerfile = root / "Dockerfile"
    return ProjectFacts(root, ray.__version__, read_dockerfile(dockerfile) if dockerfile.is_file() else None)


def shown(path: Path) -> Path:
    """`path` relative to the working directory when it lies below it (shorter messages), else as given."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def default_k8s_paths(root: Path = PROJECT_ROOT) -> list[Path]:
    return sorted(p for p in (root / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def default_cluster_paths(root: Path = PROJECT_ROOT) -> list[Path]:
    return sorted((root / "cluster").glob("*.yaml"))


def kustomize_build(directory: Path) -> str:
    """The manifests of a kustomization directory, built offline by `kubectl kustomize`."""
    try:
        done = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise DeploymentError("kubectl is not installed; it builds the kustomize overlays offline "
                              "(https://kubernetes.io/docs/tasks/tools/)") from None
    if done.returncode != 0:
        raise DeploymentError(f"kubectl kustomize {directory} failed: {done.stderr.strip()}")
    return done.stdout


def validate_k8s(paths: Sequence[Path], crds_dir: Path = DEFAULT_CRDS, facts: Optional[ProjectFacts] = None) -> Report:
    """Validate overlays (directories with a kustomization.yaml) and manifest files, and the image's Ray pin."""
    facts = facts or project_facts()
    schemas = load_crd_schemas(str(crds_dir))
    report = Report()
    if facts.image is not None:
        report.problems += image_problems(shown(facts.root / "Dockerfile"), shown(facts.root / "pyproject.toml"),
                                          facts.ray_version)
    for path in map(shown, paths):
        if path.is_dir():
            _check_manifests(str(path), kustomize_build(path), schemas, facts, report, with_lines=False)
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise DeploymentError(f"cannot read {path}: {exc.strerror}") from exc
            _check_manifests(str(path), text, schemas, facts, report, with_lines=True)
    return report


def _check_manifests(source: str, text: str, schemas: CrdSchemas, facts: ProjectFacts, report: Report,
                     with_lines: bool) -> None:
    try:
        documents = yaml_documents(text)
    except yaml.YAMLError as exc:
        report.problems.append(Problem(source, (), f"not valid YAML: {exc}"))
        return
    for resource, node in documents:
        if not isinstance(resource, dict) or not resource.get("kind") or not resource.get("apiVersion"):
            report.problems.append(Problem(source, (), "a document without apiVersion and kind",
                                           line=node.start_mark.line + 1 if with_lines else None))
            continue
        api_version, kind = resource["apiVersion"], resource["kind"]
        name = f"{kind}/{(resource.get('metadata') or {}).get('name', '?')}"
        schema = schemas.schema_for(api_version, kind)
        if schema is None:
            if schemas.covers(api_version):
                report.problems.append(Problem(source, ("kind",), f"{api_version} {kind} is not defined by the CRDs",
                                               name))
            else:
                report.unchecked.append(f"{source}: {name}")
            continue
        findings = crd_findings(resource, schema) + resource_findings(resource, facts)
        report.problems += place(findings, source, name, node if with_lines else None)
        report.checked.append(f"{source}: {name}")


def validate_cluster_configs(paths: Sequence[Path], facts: Optional[ProjectFacts] = None) -> Report:
    """Validate cluster-launcher YAML files."""
    facts = facts or project_facts()
    report = Report()
    for path in map(shown, paths):
        report.problems += cluster_config_problems(path, facts.ray_version)
        report.checked.append(str(path))
    return report
