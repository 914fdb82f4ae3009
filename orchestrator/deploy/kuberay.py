"""KubeRay resources (RayCluster, RayJob, RayService): the checks their CRD schema cannot express.

Some are the KubeRay operator's own (it refuses such resources only after `kubectl apply` succeeded): replica
bounds, submission modes, TTL only with shutdown, parseable runtimeEnvYAML. The rest are this project's
rules: rayVersion is the pinned Ray, entrypoints are `python jobs/<job>.py --config FILE [overrides]` whose
config loads, serveConfigV2 is a valid Ray Serve config for this project's application, pods run as
non-root, credentials never appear inline.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from orchestrator.cli.parser import build_parser
from orchestrator.config import load_config
from orchestrator.deploy.image import ImageFacts
from orchestrator.deploy.problems import Finding, PathPart
from orchestrator.deploy.serve_config import serve_config_findings
from orchestrator.errors import ConfigError

SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
# KubeRay appends suffixes to these names for the pods' Services (63 characters at most).
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|API_KEY", re.IGNORECASE)
INT32_MAX = 2**31 - 1  # KubeRay's default maxReplicas
INLINE_CREDENTIAL = ("a credential given inline: reference a Secret (valueFrom.secretKeyRef) or use the "
                     "ServiceAccount's IAM role (IRSA)")


@dataclass(frozen=True)
class ProjectFacts:
    """What the manifests must agree with."""

    root: Path                    # the project root = the image's working directory for entrypoints
    ray_version: str              # the Ray this project runs (installed, pinned in the Dockerfile)
    image: Optional[ImageFacts]   # from the Dockerfile, when there is one


def resource_findings(resource: dict[str, Any], facts: ProjectFacts) -> list[Finding]:
    """The semantic findings for one KubeRay resource (others: none)."""
    kind = resource.get("kind")
    spec = resource.get("spec") or {}
    if kind not in NAME_LIMITS:
        return []
    findings = _name_findings(kind, (resource.get("metadata") or {}).get("name"))
    if kind == "RayCluster":
        findings += cluster_findings(spec, ("spec",), facts)
    elif kind == "RayJob":
        findings += job_findings(spec, facts)
    else:
        findings += service_findings(spec, facts)
    return findings


def _name_findings(kind: str, name: Any) -> list[Finding]:
    if not isinstance(name, str):
        return []  # the schema reports a missing name
    if not _DNS_1035_LABEL.match(name):
        return [Finding(("metadata", "name"), f"{name!r} is not a DNS-1035 label (lower-case letters, digits and "
                                              "'-', starting with a letter), which KubeRay requires")]
    if len(name) > NAME_LIMITS[kind]:
        return [Finding(("metadata", "name"), f"{len(name)} characters; a {kind} name may have at most "
                                              f"{NAME_LIMITS[kind]}")]
    return []


def cluster_findings(spec: dict[str, Any], at: tuple[PathPart, ...], facts: ProjectFacts) -> list[Finding]:
    """A RayCluster spec (also inside a RayJob or RayService)."""
    findings = []
    version = spec.get("rayVersion")
    if version != facts.ray_version:
        got = "missing" if version is None else f"{version!r}"
        findings.append(Finding(at + ("rayVersion",), f"{got}; must be the Ray this project pins and runs, "
                                                       f"'{facts.ray_version}' (Dockerfile, pyproject.toml)"))
    head = spec.get("headGroupSpec") or {}
    findings += _group_findings(head, at + ("headGroupSpec",), facts)
    for index, group in enumerate(spec.get("workerGroupSpecs") or []):
        where = at + ("workerGroupSpecs", index)
        findings += _group_findings(group, where, facts)
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", INT32_MAX)
        if isinstance(low, int) and isinstance(high, int):
            if low > high:
                findings.append(Finding(where + ("minReplicas",), f"{low} is more than maxReplicas {high}"))
            replicas = group.get("replicas")
            if isinstance(replicas, int) and not low <= replicas <= high:
                findings.append(Finding(where + ("replicas",), f"{replicas} is outside minReplicas..maxReplicas "
                                                               f"({low}..{high})"))
            if low < high and spec.get("enableInTreeAutoscaling") is not True:
                findings.append(Finding(where + ("maxReplicas",), f"minReplicas {low} < maxReplicas {high}, but "
                                        f"{_dotted(at + ('enableInTreeAutoscaling',))} is not true: without Ray's "
                                        "autoscaler the group never scales past `replicas`; enable it (or set "
                                        "minReplicas = maxReplicas)"))
    return findings


def _dotted(at: tuple[PathPart, ...]) -> str:
    return ".".join(str(part) for part in at)


def serve_autoscaling_findings(cluster: dict[str, Any], serve_text: Any, at: tuple[PathPart, ...]) -> list[Finding]:
    """Serve deployments that autoscale on a cluster whose Ray autoscaler is off: their extra replicas
    wait for nodes that never come (the head and the fixed workers only)."""
    if cluster.get("enableInTreeAutoscaling") is True:
        return []
    try:
        config = yaml.safe_load(serve_text) if isinstance(serve_text, str) else None
    except yaml.YAMLError:
        return []  # reported by the Serve config check
    findings = []
    for app_index, app in enumerate((config or {}).get("applications") or [] if isinstance(config, dict) else []):
        for index, deployment in enumerate(app.get("deployments") or []):
            if isinstance(deployment, dict) and (deployment.get("autoscaling_config")
                                                 or deployment.get("num_replicas") == "auto"):
                key = "autoscaling_config" if deployment.get("autoscaling_config") else "num_replicas"
                findings.append(Finding(at + ("applications", app_index, "deployments", index, key),
                                        "this deployment autoscales, but spec.rayClusterConfig.enableInTreeAutoscaling"
                                        " is not true: replicas beyond what the fixed nodes fit never start; "
                                        "enable Ray's autoscaler"))
    return findings


def _group_findings(group: dict[str, Any], at: tuple[PathPart, ...], facts: ProjectFacts) -> list[Finding]:
    findings = []
    start_params = group.get("rayStartParams") or {}
    if group.get("resources") and any(start_params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
        findings.append(Finding(at + ("resources",), "set resources either here or in rayStartParams, not both "
                                                     "(KubeRay rejects the group)"))
    pod = _pod_spec(group)
    pod_at = at + ("template", "spec")
    containers = pod.get("containers") or []
    if not containers:
        return findings + [Finding(pod_at + ("containers",), "needs at least one container (the Ray container)")]
    pod_security = pod.get("securityContext") or {}
    for index, container in enumerate(containers):
        where = pod_at + ("containers", index)
        security = {**pod_security, **(container.get("securityContext") or {})}
        if security.get("runAsNonRoot") is not True:
            findings.append(Finding(pod_at + ("securityContext", "runAsNonRoot"), f"container "
                                    f"{container.get('name')!r} may run as root: set runAsNonRoot: true"))
        if security.get("runAsUser") == 0:
            findings.append(Finding(where + ("securityContext", "runAsUser"), "0 is root"))
        for env_index, variable in enumerate(container.get("env") or []):
            if "value" in variable and _CREDENTIAL_NAME.search(str(variable.get("name", ""))):
                findings.append(Finding(where + ("env", env_index, "value"), INLINE_CREDENTIAL))
    image = facts.image
    ray_container = containers[0]
    findings += _shared_memory_findings(pod, ray_container, pod_at)
    if image is not None and image.workdir and ray_container.get("workingDir", image.workdir) != image.workdir:
        findings.append(Finding(pod_at + ("containers", 0, "workingDir"),
                                f"{ray_container['workingDir']!r}; the image has the project in {image.workdir} "
                                "(Dockerfile WORKDIR), where entrypoints run"))
    user = {**pod_security, **(ray_container.get("securityContext") or {})}.get("runAsUser")
    if image is not None and image.user and user is not None and str(user) != image.user.split(":")[0]:
        findings.append(Finding(pod_at + ("securityContext", "runAsUser"),
                                f"{user}; the image's files belong to user {image.user} (Dockerfile USER)"))
    return findings


def _requests_gpus(container: dict[str, Any]) -> bool:
    resources = container.get("resources") or {}
    return any(str(key).endswith("/gpu") for part in ("requests", "limits") for key in (resources.get(part) or {}))


def _mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath → the volume mounted there, for one container of a pod."""
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    return {m.get("mountPath"): volumes.get(m.get("name"), {}) for m in container.get("volumeMounts") or []}


def _shared_memory_findings(pod: dict[str, Any], container: dict[str, Any], pod_at: tuple[PathPart, ...]) -> list[Finding]:
    """A GPU container needs a memory-backed /dev/shm: NCCL's transport buffers outgrow the runtime's 64 MB."""
    if not _requests_gpus(container):
        return []
    shm = _mounts(pod, container).get("/dev/shm")
    if shm is None or (shm.get("emptyDir") or {}).get("medium") != "Memory":
        return [Finding(pod_at + ("containers", 0, "volumeMounts"),
                        "a GPU container without a memory-backed /dev/shm: NCCL needs more shared memory than the "
                        "container runtime's 64 MB; mount an emptyDir {medium: Memory} volume at /dev/shm")]
    return []


def node_cache_findings(spec: dict[str, Any], cache_dir: Optional[str], at: tuple[PathPart, ...]) -> list[Finding]:
    """The config's storage.node_cache.dir must be a volume in every worker pod, not the container's own layer
    (size-limited, and gone with the container)."""
    if not cache_dir:
        return []
    findings = []
    for index, group in enumerate(spec.get("workerGroupSpecs") or []):
        pod = _pod_spec(group)
        containers = pod.get("containers") or []
        if not containers:
            continue
        mounted = [path for path in _mounts(pod, containers[0]) if isinstance(path, str) and
                   (cache_dir == path or cache_dir.startswith(path.rstrip("/") + "/"))]
        if not mounted:
            findings.append(Finding(at + ("workerGroupSpecs", index, "template", "spec", "containers", 0,
                                          "volumeMounts"),
                                    f"nothing is mounted at storage.node_cache.dir {cache_dir!r} of the job's config: "
                                    "the node cache would fill the container's own layer; mount a volume on the "
                                    "node's local disk there"))
    return findings


def _pod_spec(group: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The pod spec of a head or worker group ({} when absent)."""
    return ((group or {}).get("template") or {}).get("spec") or {}


def job_findings(spec: dict[str, Any], facts: ProjectFacts) -> list[Finding]:
    """A RayJob spec."""
    findings = []
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        findings.append(Finding(("spec", "submissionMode"),
                                f"{mode!r}; expected one of {', '.join(SUBMISSION_MODES)}"))
    shutdown = spec.get("shutdownAfterJobFinishes") is True
    if spec.get("ttlSecondsAfterFinished", 0) and not shutdown:
        findings.append(Finding(("spec", "ttlSecondsAfterFinished"),
                                "only takes effect with shutdownAfterJobFinishes: true (KubeRay rejects it)"))
    if spec.get("suspend") and not shutdown:
        findings.append(Finding(("spec", "suspend"),
                                "a RayJob can be suspended only with shutdownAfterJobFinishes: true"))
    for field, lowest in (("activeDeadlineSeconds", 1), ("backoffLimit", 0), ("ttlSecondsAfterFinished", 0)):
        value = spec.get(field)
        if isinstance(value, int) and value < lowest:
            findings.append(Finding(("spec", field), f"{value}; must be >= {lowest}"))
    if mode == "InteractiveMode" and isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] > 0:
        findings.append(Finding(("spec", "backoffLimit"), "InteractiveMode does not support retries"))
    cluster = spec.get("rayClusterSpec")
    if mode == "SidecarMode":
        for field in ("submitterPodTemplate", "submitterConfig"):
            if field in spec:
                findings.append(Finding(("spec", field), "not supported in SidecarMode (the submitter is a "
                                                         "container of the head pod)"))
        restart = _pod_spec((cluster or {}).get("headGroupSpec")).get("restartPolicy")
        if restart not in (None, "Never"):
            findings.append(Finding(("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "restartPolicy"),
                                    f"{restart!r}; SidecarMode needs Never or unset"))
    if cluster is None and not spec.get("clusterSelector"):
        findings.append(Finding(("spec", "rayClusterSpec"), "set rayClusterSpec (or clusterSelector)"))
    elif cluster is not None:
        findings += cluster_findings(cluster, ("spec", "rayClusterSpec"), facts)
    if "runtimeEnvYAML" in spec:
        findings += runtime_env_findings(spec["runtimeEnvYAML"], ("spec", "runtimeEnvYAML"))
    entry_findings, config = entrypoint_findings(spec.get("entrypoint"), ("spec", "entrypoint"), facts.root)
    if config is not None and cluster is not None:
        findings += node_cache_findings(cluster, config.storage.node_cache.dir, ("spec", "rayClusterSpec"))
    return findings + entry_findings


def service_findings(spec: dict[str, Any], facts: ProjectFacts) -> list[Finding]:
    """A RayService spec."""
    cluster = spec.get("rayClusterConfig") or {}
    findings = cluster_findings(cluster, ("spec", "rayClusterConfig"), facts)
    ports = (_pod_spec(cluster.get("headGroupSpec")).get("containers") or [{}])[0].get("ports") or []
    serve_port = next((p.get("containerPort") for p in ports if p.get("name") == "serve"), None)
    if serve_port is None:
        findings.append(Finding(("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0,
                                 "ports"), "no port named 'serve': KubeRay's serve Service exposes that port"))
    if "serveConfigV2" not in spec:
        return findings + [Finding(("spec", "serveConfigV2"), "required: the Ray Serve config to deploy")]
    findings += serve_autoscaling_findings(cluster, spec["serveConfigV2"], ("spec", "serveConfigV2"))
    return findings + serve_config_findings(spec["serveConfigV2"], ("spec", "serveConfigV2"), facts.root, serve_port)


def runtime_env_findings(text: Any, at: tuple[PathPart, ...]) -> list[Finding]:
    """runtimeEnvYAML: a YAML mapping of known runtime_env fields that Ray's RuntimeEnv accepts."""
    from ray.runtime_env import RuntimeEnv

    try:
        env = yaml.safe_load(text) if isinstance(text, str) else text
    except yaml.YAMLError as exc:
        return [Finding(at, f"not valid YAML: {exc}")]
    if env is None:
        return []
    if not isinstance(env, dict):
        return [Finding(at, f"expected a mapping of runtime_env fields, got {type(env).__name__}")]
    known = sorted(f for f in RuntimeEnv.known_fields if not f.startswith("_"))
    unknown = [Finding(at + (k,), f"unknown runtime_env field (known: {', '.join(known)})") for k in env
               if k not in RuntimeEnv.known_fields]
    if unknown:
        return unknown
    findings = [Finding(at + ("env_vars", name), INLINE_CREDENTIAL) for name in (env.get("env_vars") or {})
                if _CREDENTIAL_NAME.search(str(name))]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as exc:
        findings.append(Finding(at, f"Ray rejects this runtime_env: {exc}"))
    return findings


def entrypoint_findings(entrypoint: Any, at: tuple[PathPart, ...], root: Path) -> tuple[list[Finding], Any]:
    """`python jobs/<job>.py --config FILE [options] [key=value ...]`, parsed by the job's own CLI, config loaded:
    (findings, the loaded config or None)."""
    expected = "expected `python jobs/<job>.py --config FILE [key=value ...]`"
    try:
        words = shlex.split(entrypoint) if isinstance(entrypoint, str) else []
    except ValueError as exc:
        return [Finding(at, f"cannot be split into words: {exc}")], None
    if len(words) < 2 or words[0] not in ("python", "python3") or not re.fullmatch(r"jobs/\w+\.py", words[1]):
        return [Finding(at, f"{expected}, got {entrypoint!r}")], None
    script = root / words[1]
    if not script.is_file():
        return [Finding(at, f"{words[1]} does not exist in {root}")], None
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args([script.stem, *words[2:]])
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()
        return [Finding(at, f"{words[1]} rejects its arguments: {message[-1] if message else 'usage error'}")], None
    config = getattr(args, "config", None)
    if config is None:
        return [Finding(at, f"{expected}: --config is missing")], None
    try:
        return [], load_config(root / config, getattr(args, "overrides", []))
    except ConfigError as exc:
        return [Finding(at, f"its config does not load: {exc}")], None
