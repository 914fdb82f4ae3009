"""Where an artifact came from: package versions and the source revision (written into lineage.json)."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata

TRACKED_PACKAGES = ("ray-llm-orchestrator", "torch", "transformers", "peft", "deepspeed", "ray", "pyarrow", "boto3")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide a run's results."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> str:
    """The git commit of the orchestrator source, or 'unknown' (e.g. a `ray job submit` working-dir copy)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"
