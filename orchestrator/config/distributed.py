"""Config section: the cluster shape and DeepSpeed ZeRO settings."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from orchestrator.config.base import Section


class ModelTaskConfig(Section):
    """Resources of the model tasks (export with LoRA merge) Ray runs on the cluster, not in the driver."""

    num_cpus: float = Field(1, gt=0, description="CPUs of the task (also its torch thread count).")
    memory_gb: Optional[float] = Field(
        None, gt=0, description="Memory Ray reserves for the task (the merged model's size in the load dtype, and "
        "some); empty = no reservation."
    )
    use_gpu: bool = Field(False, description="Give the task a GPU (merges of big models run faster).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources, e.g. {worker: 0.01} to keep the task off the head."
    )


class DistributedConfig(Section):
    """How many workers, on what hardware, with which DeepSpeed ZeRO stage."""

    num_workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU on GPU clusters).")
    min_workers: Optional[int] = Field(
        None, gt=0, description="Elastic training: Ray Train starts, and after a lost node restarts, with as many "
        "workers as the cluster has room for between min_workers and num_workers (without waiting for a "
        "replacement), and grows back when capacity returns. Each change of size continues from the last "
        "checkpoint's weights (needs checkpoint.on_world_size_change=reload_weights). Empty: always num_workers."
    )
    use_gpu: bool = Field(False, description="Give each worker a GPU (NCCL backend); else CPU with gloo.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker (also its torch thread count).")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources per worker, e.g. {accelerator_type:A100: 0.01}."
    )
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 (DDP), 1, 2 or 3.")
    offload_optimizer: bool = Field(False, description="ZeRO 1-3: keep optimizer states in CPU memory.")
    offload_params: bool = Field(False, description="ZeRO 3: keep parameters in CPU memory.")
    offload_device: Literal["cpu", "nvme"] = Field("cpu", description="Where offloaded states live.")
    nvme_path: Optional[str] = Field(None, description="Local NVMe directory for offload_device: nvme.")
    overlap_comm: Optional[bool] = Field(
        None, description="ZeRO 2/3: overlap gradient reduction with backward. Default: on with GPUs, off on CPU."
    )
    reduce_bucket_size: int = Field(50_000_000, gt=0, description="ZeRO 2/3: elements per gradient reduction bucket.")
    allgather_bucket_size: int = Field(50_000_000, gt=0, description="ZeRO 2: elements per parameter all-gather.")
    deepspeed_config: Optional[str | dict[str, Any]] = Field(
        None, description="DeepSpeed JSON (file path or URI, or an inline mapping) whose keys override the "
        "generated config (deep merge; nested keys replace one by one). The merged config is logged and saved "
        "with every checkpoint.",
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts Ray Train attempts (-1 = unlimited).")
    collective_timeout_s: int = Field(
        1800, gt=0, description="Timeout of the workers' collectives (torch.distributed, NCCL/gloo): longer than the "
        "slowest checkpoint save, when every rank waits for the one that writes (a 7B ZeRO-3 save gathers and uploads "
        "GBs).")
    model_tasks: ModelTaskConfig = Field(
        default_factory=ModelTaskConfig, description="Where exports (LoRA merges) run: a Ray task with these "
        "resources, so the driver (the head node) never holds the model."
    )

    @model_validator(mode="after")
    def _elastic_range(self) -> "DistributedConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"distributed.min_workers={self.min_workers} is more than distributed.num_workers="
                             f"{self.num_workers}; elastic training runs between the two")
        return self

    @property
    def elastic(self) -> bool:
        """Whether Ray Train may run this stage with fewer than num_workers workers."""
        return self.min_workers is not None and self.min_workers < self.num_workers

    def ray_num_workers(self) -> int | tuple[int, int]:
        """Ray Train's ScalingConfig.num_workers: a fixed count, or the (min, max) range of elastic training."""
        return (self.min_workers, self.num_workers) if self.elastic else self.num_workers
