"""Config sections: where checkpoints and outputs go, and how remote storage is reached."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, SecretStr

from orchestrator.config.base import Section
from orchestrator.storage import S3Settings


class CheckpointConfig(Section):
    """Where checkpoints and stage outputs go and how often they are written."""

    storage_path: str = Field("runs", description="Root for checkpoints, logs and exported models (path or URI).")
    every_n_steps: Optional[int] = Field(None, gt=0, description="Also checkpoint every N optimizer steps.")
    at_epoch_end: bool = Field(True, description="Checkpoint at the end of every epoch.")
    keep: Optional[int] = Field(3, gt=0, description="Checkpoints kept per stage (newest); empty = all.")
    on_world_size_change: Literal["reload_weights", "fail"] = Field(
        "reload_weights", description="Resuming with a different number of workers: reload the checkpoint's "
        "weights with a fresh optimizer (a warning is logged), or fail.",
    )
    upload: Literal["async", "sync"] = Field(
        "async", description="How a checkpoint reaches storage: `async` uploads it in the background while training "
        "goes on (Ray Train's CheckpointUploadMode.ASYNC; a failed upload still fails the run), `sync` waits for it. "
        "Either way a checkpoint counts only once its manifest verifies, so an upload cut short is never resumed from.",
    )
    allow_job_working_dir: bool = Field(
        False, description="In a Ray job submitted with --working-dir, a relative `storage_path` lands in Ray's "
        "temporary copy of that directory and is deleted with it: refused unless this is true (then a warning "
        "is logged). Prefer an absolute path every node shares, or s3://.",
    )


class S3Config(Section):
    """S3 or an S3-compatible store (MinIO, Ceph). Empty fields use the AWS default chain
    (AWS_* environment variables, ~/.aws profiles, instance roles / IRSA)."""

    endpoint_url: Optional[str] = Field(
        None, description="e.g. http://minio:9000 for S3-compatible stores; default AWS_ENDPOINT_URL or AWS."
    )
    region: Optional[str] = Field(None, description="Region; default AWS_REGION / AWS_DEFAULT_REGION.")
    access_key_id: Optional[SecretStr] = Field(None, description="Access key (prefer environment or roles).")
    secret_access_key: Optional[SecretStr] = Field(None, description="Secret key (never logged or saved).")
    session_token: Optional[SecretStr] = Field(None, description="Session token for temporary credentials.")
    profile: Optional[str] = Field(None, description="Named profile from ~/.aws/config.")
    max_attempts: int = Field(10, ge=1, description="Attempts per S3 request (botocore/pyarrow standard retry).")
    multipart_threshold_mb: int = Field(64, ge=5, description="Files above this size upload in parts.")
    max_concurrency: int = Field(8, ge=1, description="Parallel transfers.")


class NodeCacheConfig(Section):
    """The node-local cache remote models, tokenizers and checkpoints are fetched into, once per node."""

    dir: Optional[str] = Field(
        None, description="Directory on each node (a local NVMe disk); default <tmp>/orchestrator-node-cache."
    )
    max_gb: float = Field(100.0, gt=0, description="Bound on the cache; least recently used entries go first.")


class StorageConfig(Section):
    """How to reach remote storage used by any path of the config."""

    s3: S3Config = Field(default_factory=S3Config, description="S3 settings.")
    node_cache: NodeCacheConfig = Field(default_factory=NodeCacheConfig, description="Node-local download cache.")


def s3_settings(storage_config: StorageConfig) -> S3Settings:
    """The storage layer's S3 settings from the config (secrets revealed only here)."""
    s3 = storage_config.s3

    def reveal(secret: Optional[SecretStr]) -> Optional[str]:
        return secret.get_secret_value() if secret is not None else None

    return S3Settings(
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=reveal(s3.access_key_id),
        secret_access_key=reveal(s3.secret_access_key),
        session_token=reveal(s3.session_token),
        profile=s3.profile,
        max_attempts=s3.max_attempts,
        multipart_threshold_mb=s3.multipart_threshold_mb,
        max_concurrency=s3.max_concurrency,
    )
