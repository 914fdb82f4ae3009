"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (read-only real data). In CI a missing copy is a failure, elsewhere a skip."""
    if not SHARED_DATA.is_dir() or not (SHARED_DATA / "SOURCES.md").is_file():
        message = f"shared test data not found at {SHARED_DATA} (expected ../shared/data beside the checkout)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: the data is required)")
        pytest.skip(message)
    return SHARED_DATA


KUBERAY_CRDS = (REPO_ROOT / ".." / "shared" / "kuberay-v1.7.0" / "crds").resolve()


@pytest.fixture(scope="session")
def kuberay_crds() -> Path:
    """../shared/kuberay-v1.7.0/crds (read-only KubeRay CRDs) and `kubectl` to build the overlays.
    In CI a missing one is a failure, elsewhere a skip."""
    import shutil

    missing = []
    if not (KUBERAY_CRDS / "ray.io_rayjobs.yaml").is_file():
        missing.append(f"the KubeRay CRDs at {KUBERAY_CRDS} (expected ../shared/kuberay-v1.7.0/crds)")
    if shutil.which("kubectl") is None:
        missing.append("kubectl (its built-in kustomize builds the k8s/ overlays offline)")
    if missing:
        message = "not found: " + "; ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: required)")
        pytest.skip(message)
    return KUBERAY_CRDS
