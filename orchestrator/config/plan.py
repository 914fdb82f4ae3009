"""Config section: the memory and throughput planner's assumptions."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from orchestrator.config.base import Section


class PlanConfig(Section):
    """Assumptions of the memory and throughput planner (`orchestrator plan` and the pre-launch check)."""

    gpu_memory_gib: float = Field(
        80.0, gt=0, description="Memory of one GPU in GiB (A100/H100 80GB: 80). With distributed.use_gpu=false: "
        "the memory budget of one CPU worker."
    )
    gpus_per_node: Optional[int] = Field(
        None, gt=0, description="GPUs (workers) per node; default distributed.num_workers / plan.nodes. "
        "gpus_per_node x nodes must equal distributed.num_workers."
    )
    nodes: int = Field(1, gt=0, description="Nodes the workers are spread over (sets CPU memory per node).")
    host_memory_gib: Optional[float] = Field(
        None, gt=0, description="RAM of one node in GiB (e.g. 1152 on an 8x A100 p4d node). When set, the plan also "
        "checks host memory per node: loading the model in every local worker (or one module at a time under "
        "ZeRO-3's partitioned loading) and the CPU-offloaded states."
    )
    mfu: float = Field(
        0.4, gt=0, le=1, description="Assumed model FLOPs utilisation: share of peak_tflops the GPUs sustain on "
        "training FLOPs (recomputation included)."
    )
    peak_tflops: float = Field(
        312.0, gt=0, description="Peak dense 16-bit TFLOP/s of one GPU (A100 bf16: 312, H100 SXM: 989)."
    )
    strict: bool = Field(
        False, description="Refuse to launch a stage the planner says will not fit (else only warn)."
    )
