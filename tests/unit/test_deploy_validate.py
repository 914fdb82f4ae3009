"""The deployment files (k8s/, cluster/, Dockerfile) and their offline validator (orchestrator.deploy).

The shipped overlays, built by kustomize, must pass the KubeRay v1.7.0 CRDs and the semantic checks; each
kind of mistake those checks exist for must be reported at its field.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.deploy.crd_schema import crd_findings, load_crd_schemas
from orchestrator.deploy.image import image_problems
from orchestrator.deploy.kuberay import resource_findings
from orchestrator.deploy.launcher import cluster_config_problems
from orchestrator.deploy.problems import field_path
from orchestrator.deploy.validate import (
    default_cluster_paths,
    default_k8s_paths,
    kustomize_build,
    project_facts,
    validate_cluster_configs,
    validate_k8s,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "k8s"
RAY_KINDS = ["RayCluster/llm-cluster", "RayJob/llm-pipeline", "RayJob/llm-pretrain", "RayJob/llm-sft",
             "RayJob/llm-tune", "RayService/llm-serve"]


@pytest.fixture(scope="module")
def facts():
    return project_facts()


@pytest.fixture(scope="module")
def overlays(kuberay_crds) -> dict[str, dict[str, dict]]:
    """Each overlay built by kustomize: {overlay: {"Kind/name": resource}}."""
    built = {}
    for path in default_k8s_paths():
        docs = yaml.safe_load_all(kustomize_build(path))
        built[path.name] = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}
    return built


def paths_of(findings) -> list[str]:
    return [field_path(f.parts) for f in findings]


def test_every_overlay_validates_against_the_crds_and_the_semantic_checks(kuberay_crds):
    report = validate_k8s(default_k8s_paths(), kuberay_crds)
    assert report.ok, "\n".join(map(str, report.problems))
    for overlay in ("a100", "dev"):
        assert sorted(c.split(": ")[1] for c in report.checked if c.endswith(tuple(RAY_KINDS))
                      and f"overlays/{overlay}:" in c) == RAY_KINDS


def test_production_overlay_has_the_promised_shape(overlays, facts):
    a100 = overlays["a100"]
    cluster = a100["RayCluster/llm-cluster"]["spec"]
    assert cluster["rayVersion"] == facts.ray_version == facts.image.ray_version
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    workers = cluster["workerGroupSpecs"][0]
    assert 0 <= workers["minReplicas"] <= workers["maxReplicas"]
    pod = workers["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {e["name"] for e in container["env"]} >= {"NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}
    # the node cache of the jobs' config is a volume of the worker pods (on the node's disk, not the container's)
    from orchestrator.config import load_config

    config = load_config(REPO_ROOT / "configs" / "cluster-a100.yaml")
    assert {"name": "node-cache", "mountPath": config.storage.node_cache.dir} in container["volumeMounts"]
    assert config.distributed.collective_timeout_s >= 3600  # a 7B ZeRO-3 save fits inside the collectives' timeout
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "eks.amazonaws.com/role-arn" in a100["ServiceAccount/ray-llm"]["metadata"]["annotations"]
    for name in ("pretrain", "sft", "pipeline", "tune"):
        job = a100[f"RayJob/llm-{name}"]["spec"]
        assert shlex.split(job["entrypoint"])[:4] == ["python", f"jobs/{name}.py", "--config",
                                                      "configs/cluster-a100.yaml"]
        assert (job["submissionMode"], job["shutdownAfterJobFinishes"], job["backoffLimit"]) == ("SidecarMode", True, 0)
        assert job["ttlSecondsAfterFinished"] > 0 and job["activeDeadlineSeconds"] > 0
        assert job["rayClusterSpec"] == cluster  # the overlay copies the RayCluster's spec into every job
    service = a100["RayService/llm-serve"]["spec"]
    assert service["rayClusterConfig"] == cluster
    app = yaml.safe_load(service["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "orchestrator.serve.app:app_builder"
    scaling = app["deployments"][0]["autoscaling_config"]
    assert scaling["min_replicas"] <= scaling["max_replicas"] and scaling["target_ongoing_requests"] > 0


def test_dev_overlay_runs_the_tiny_config_on_cpus(overlays):
    dev = overlays["dev"]
    worker = dev["RayCluster/llm-cluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    for name, resource in dev.items():
        if name.startswith("RayJob/"):
            assert "--config configs/cluster-dev.yaml" in resource["spec"]["entrypoint"]
            assert resource["spec"]["rayClusterSpec"] == dev["RayCluster/llm-cluster"]["spec"]


@pytest.mark.parametrize("fixture, path, line, message", [
    ("typo-field.yaml", "spec.workerGroupSpecs[0].groupNmae", 17, "unknown field; did you mean 'groupName'?"),
    ("gpu-limit-8x.yaml", 'spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits["nvidia.com/gpu"]',
     27, "expected a Kubernetes quantity"),
    ("min-above-max.yaml", "spec.workerGroupSpecs[0].minReplicas", 18, "4 is more than maxReplicas 2"),
])
def test_broken_fixtures_fail_naming_file_line_and_field(kuberay_crds, fixture, path, line, message):
    report = validate_k8s([FIXTURES / fixture], kuberay_crds)
    matching = [p for p in report.problems if p.path == path]
    assert matching, "\n".join(map(str, report.problems))
    assert matching[0].line == line and message in matching[0].message
    assert str(matching[0]).startswith(f"tests/fixtures/k8s/{fixture}:{line}: RayCluster/broken {path}: ")


def _mutated_dev(overlays, key: str, change) -> dict:
    resource = copy.deepcopy(overlays["dev"][key])
    change(resource["spec"])
    return resource


def _set_serve(spec, edit):
    config = yaml.safe_load(spec["serveConfigV2"])
    edit(config)
    spec["serveConfigV2"] = yaml.safe_dump(config)


def _deployment(config):
    return config["applications"][0]["deployments"][0]


def _head(spec):
    return spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


SERVE_AT = "spec.serveConfigV2.applications[0].deployments[0]"


@pytest.mark.parametrize("key, change, path, message", [
    ("RayJob/llm-pretrain", lambda s: s["rayClusterSpec"].update(rayVersion="2.59.0"),
     "spec.rayClusterSpec.rayVersion", "must be the Ray this project pins"),
    ("RayJob/llm-pretrain", lambda s: s.update(submissionMode="K8sJob"), "spec.submissionMode", "expected one of"),
    ("RayJob/llm-pretrain", lambda s: s.update(shutdownAfterJobFinishes=False, suspend=False),
     "spec.ttlSecondsAfterFinished", "shutdownAfterJobFinishes: true"),
    ("RayJob/llm-pretrain", lambda s: s.update(runtimeEnvYAML="env_vars: [unclosed"), "spec.runtimeEnvYAML",
     "not valid YAML"),
    ("RayJob/llm-pretrain", lambda s: s.update(runtimeEnvYAML="env_var: {A: b}"), "spec.runtimeEnvYAML.env_var",
     "unknown runtime_env field"),
    ("RayJob/llm-pretrain", lambda s: s.update(runtimeEnvYAML="env_vars: {AWS_SECRET_ACCESS_KEY: x}"),
     "spec.runtimeEnvYAML.env_vars.AWS_SECRET_ACCESS_KEY", "credential given inline"),
    ("RayJob/llm-pretrain", lambda s: s.update(entrypoint=s["entrypoint"] + " pretrain.train.epoch=2"),
     "spec.entrypoint", "its config does not load"),
    ("RayJob/llm-pretrain", lambda s: s.update(entrypoint="python jobs/nothing.py --config configs/cluster-dev.yaml"),
     "spec.entrypoint", "jobs/nothing.py does not exist"),
    ("RayJob/llm-tune", lambda s: s.update(entrypoint=s["entrypoint"].replace("--stage sft", "--stage rlhf")),
     "spec.entrypoint", "rejects its arguments"),
    ("RayJob/llm-sft", lambda s: _head(s)["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY",
                                                                          "value": "x"}),
     "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].env[2].value", "credential given inline"),
    ("RayJob/llm-sft", lambda s: _head(s).pop("securityContext"),
     "spec.rayClusterSpec.headGroupSpec.template.spec.securityContext.runAsNonRoot", "may run as root"),
    ("RayService/llm-serve", lambda s: _set_serve(s, lambda c: _deployment(c)["autoscaling_config"].update(
        min_replicas=3, max_replicas=2)), f"{SERVE_AT}.autoscaling_config.min_replicas", "more than max_replicas 2"),
    ("RayService/llm-serve", lambda s: _set_serve(s, lambda c: _deployment(c)["autoscaling_config"].update(
        max_replica=4)), f"{SERVE_AT}.autoscaling_config.max_replica", "did you mean 'max_replicas'?"),
    ("RayService/llm-serve", lambda s: _set_serve(s, lambda c: _deployment(c).update(max_ongoing_request=4)),
     f"{SERVE_AT}.max_ongoing_request", "did you mean 'max_ongoing_requests'?"),
    ("RayService/llm-serve", lambda s: _set_serve(s, lambda c: _deployment(c).update(name="Server")),
     f"{SERVE_AT}.name", "is not a deployment of orchestrator.serve.app:app_builder (ModelServer, OpenAIIngress)"),
    ("RayService/llm-serve", lambda s: _set_serve(s, lambda c: c["applications"][0]["args"].update(
        overrides="serve.max_batch_size=64")), "spec.serveConfigV2.applications[0].args", "cannot be built"),
    ("RayService/llm-serve", lambda s: _set_serve(s, lambda c: c["http_options"].update(port=9000)),
     "spec.serveConfigV2.http_options.port", "port named 'serve' is 8000"),
    ("RayJob/llm-pretrain", lambda s: s["rayClusterSpec"].pop("enableInTreeAutoscaling"),
     "spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas",
     "minReplicas 1 < maxReplicas 2, but spec.rayClusterSpec.enableInTreeAutoscaling is not true"),
    ("RayService/llm-serve", lambda s: s["rayClusterConfig"].update(enableInTreeAutoscaling=False),
     f"{SERVE_AT}.autoscaling_config", "this deployment autoscales, but spec.rayClusterConfig.enableInTreeAutoscaling"),
])
def test_semantic_checks_name_the_field(overlays, facts, key, change, path, message):
    resource = _mutated_dev(overlays, key, change)
    findings = resource_findings(resource, facts)
    matching = [f for f in findings if field_path(f.parts) == path]
    assert matching, paths_of(findings)
    assert message in matching[0].message, matching[0].message


WORKER_AT = "spec.rayClusterSpec.workerGroupSpecs[0].template.spec"


def _worker_pod(spec):
    return spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def _drop_mount(spec, name):
    pod = _worker_pod(spec)
    pod["containers"][0]["volumeMounts"] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] != name]


@pytest.mark.parametrize("change, message", [
    (lambda s: _drop_mount(s, "dshm"), "a GPU container without a memory-backed /dev/shm"),
    (lambda s: _worker_pod(s)["volumes"][0]["emptyDir"].pop("medium"), "a GPU container without a memory-backed"),
    (lambda s: _drop_mount(s, "node-cache"),
     "nothing is mounted at storage.node_cache.dir '/mnt/node-cache' of the job's config"),
])
def test_multi_node_needs_are_checked_on_the_gpu_workers(overlays, facts, change, message):
    resource = copy.deepcopy(overlays["a100"]["RayJob/llm-pretrain"])
    assert resource_findings(resource, facts) == []
    change(resource["spec"])
    findings = resource_findings(resource, facts)
    matching = [f for f in findings if field_path(f.parts) == f"{WORKER_AT}.containers[0].volumeMounts"]
    assert matching and message in matching[0].message, paths_of(findings)


def test_crd_schema_applies_the_api_servers_rules(kuberay_crds, overlays):
    schemas = load_crd_schemas(str(kuberay_crds))
    job = copy.deepcopy(overlays["dev"]["RayJob/llm-pretrain"])
    schema = schemas.schema_for(job["apiVersion"], job["kind"])
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    del workers["maxReplicas"]              # required, but has a default: accepted
    job["spec"]["jobId"] = None             # nulls are dropped: accepted
    assert crd_findings(job, schema) == []
    workers["template"]["spec"]["containers"][0]["env"].append({"name": "NCCL_DEBUG", "value": "INFO"})
    job["spec"]["entrypiont"] = "x"
    del workers["groupName"]                # required without a default
    assert sorted(paths_of(crd_findings(job, schema))) == [
        "spec.entrypiont",
        "spec.rayClusterSpec.workerGroupSpecs[0].groupName",
        "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].env",  # duplicate NCCL_DEBUG
    ]


def test_dockerfile_must_pin_the_installed_ray(tmp_path, facts):
    assert image_problems(REPO_ROOT / "Dockerfile", REPO_ROOT / "pyproject.toml", facts.ray_version) == []
    dockerfile = tmp_path / "Dockerfile"
    text = (REPO_ROOT / "Dockerfile").read_text().replace(f"ARG RAY_VERSION={facts.ray_version}",
                                                         "ARG RAY_VERSION=2.59.0")
    dockerfile.write_text(text.replace("USER 1000", "USER root"))
    problems = image_problems(dockerfile, REPO_ROOT / "pyproject.toml", facts.ray_version)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("ARG RAY_VERSION="))
    assert [(p.line, p.message.split(":")[0]) for p in problems][:1] == [
        (line, f"ARG RAY_VERSION=2.59.0 is not the Ray this project runs ({facts.ray_version}, installed and allowed "
               "by pyproject.toml)")]
    assert any("runs as root" in p.message for p in problems)


def test_shipped_cluster_configs_pass_rays_own_checks(facts):
    report = validate_cluster_configs(default_cluster_paths())
    assert report.ok, "\n".join(map(str, report.problems))
    assert sorted(Path(c).name for c in report.checked) == ["aws.yaml", "gcp.yaml", "local.yaml"]


@pytest.mark.parametrize("edit, path, message", [
    (lambda c: c.update(max_worker=c.pop("max_workers")), "max_worker", "did you mean 'max_workers'?"),
    (lambda c: c["available_node_types"]["a100x8"].update(min_workers=3, max_workers=2),
     "available_node_types.a100x8.min_workers", "3 is more than max_workers 2"),
    (lambda c: c.update(setup_commands=['pip install "ray[default]==2.59.0"']), "setup_commands[0]",
     "installs ray==2.59.0"),
    (lambda c: c.pop("setup_commands"), "setup_commands", "installs Ray nightly"),
    (lambda c: c.update(head_node_type="cpu-head"), "", "`head_node_type` must be one of `available_node_types`"),
])
def test_broken_cluster_configs_fail_naming_the_field(tmp_path, facts, edit, path, message):
    config = yaml.safe_load((REPO_ROOT / "cluster" / "aws.yaml").read_text())
    edit(config)
    broken = tmp_path / "aws.yaml"
    broken.write_text(yaml.safe_dump(config, sort_keys=False))
    problems = cluster_config_problems(broken, facts.ray_version)
    matching = [p for p in problems if p.path == path and message in p.message]
    assert matching, "\n".join(map(str, problems))
    if path.split(".")[0].split("[")[0] in config:  # a field of the file: its own line, not the document's
        assert matching[0].line is not None and matching[0].line > 1


def test_cli_exit_status_says_whether_the_files_are_valid(kuberay_crds, capsys, monkeypatch):
    from orchestrator.cli.main import main

    monkeypatch.chdir(REPO_ROOT)
    assert main(["k8s", "validate", "--crds", str(kuberay_crds), "tests/fixtures/k8s/min-above-max.yaml"]) == 1
    assert ("PROBLEM  tests/fixtures/k8s/min-above-max.yaml:18: RayCluster/broken spec.workerGroupSpecs[0]."
            "minReplicas: 4 is more than maxReplicas 2") in capsys.readouterr().out
    assert main(["cluster", "validate"]) == 0
    assert "checked  cluster/aws.yaml" in capsys.readouterr().out
