"""What a serving application needs, resolved on the driver from the `serve` section: the model URI,
generation defaults, API-key digests, adapters, storage settings, replica options. Shared by both engines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator import storage
from orchestrator.config import PipelineConfig, ServeConfig, s3_settings
from orchestrator.errors import ConfigError
from orchestrator.layout import RunLayout
from orchestrator.serve.http import digest, load_api_keys
from orchestrator.serve.protocol import GenerationParams


@dataclass(frozen=True)
class ServeSettings:
    """What the deployments need, resolved on the driver (API keys only as sha256 digests)."""

    model_uri: str
    served_model_name: str
    defaults: GenerationParams
    max_tokens_limit: int
    max_batch_size: int
    num_threads: int
    trust_remote_code: bool
    api_key_digests: tuple[str, ...] = field(default=(), repr=False)
    adapters: dict[str, str] = field(default_factory=dict)
    max_adapters_per_replica: int = 4
    s3: Any = None


def default_model_uri(config: PipelineConfig) -> str:
    """serve.model, else the pipeline's final model: models/preference, models/sft or models/pretrain (the last
    stage that exists)."""
    if config.serve.model:
        return config.serve.model
    layout = RunLayout.of(config)
    for stage in ("preference", "sft", "pretrain"):
        if storage.exists(storage.join(layout.model(stage), "config.json")):
            return layout.model(stage)
    raise ConfigError(f"no model to serve: set serve.model, or train first (looked in {layout.models}/preference, "
                      "/sft and /pretrain)")


def serve_settings(config: PipelineConfig) -> ServeSettings:
    cfg = config.serve
    return ServeSettings(
        model_uri=default_model_uri(config),
        served_model_name=cfg.served_model_name or config.run_name,
        defaults=GenerationParams.from_config(cfg.defaults),
        max_tokens_limit=cfg.max_tokens_limit,
        max_batch_size=cfg.max_batch_size,
        num_threads=max(1, int(cfg.num_cpus_per_replica)),
        trust_remote_code=cfg.trust_remote_code,
        api_key_digests=tuple(digest(k) for k in load_api_keys(cfg)),
        adapters=dict(cfg.adapters),
        max_adapters_per_replica=cfg.max_adapters_per_replica,
        s3=s3_settings(config.storage),
    )


def replica_options(cfg: ServeConfig) -> dict[str, Any]:
    """Deployment options of the model replicas: fixed or autoscaled count, concurrency, resources."""
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica},
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    return options
