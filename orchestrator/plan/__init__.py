"""Memory and throughput planning: will a training configuration fit, what to change, how long it takes.

Pure functions, no Ray and no torch: `model_shape` (parameter counts), `memory` (ZeRO-aware model
states, activations, buffers), `throughput` (FLOPs at an assumed MFU), `planner` (fit, cheapest
change, pre-launch check, requirements table), `render` (text / Markdown) and `command`
(what `orchestrator plan` prints).
"""

from orchestrator.plan.model_shape import PRESETS, MethodSpec, ModelShape, count_parameters, preset_shape
from orchestrator.plan.command import plan_command
from orchestrator.plan.planner import (
    PlanReport,
    TrainingSetup,
    check_fits,
    plan_stage,
    plan_training,
    requirements_table,
    suggest_change,
)

__all__ = [
    "PRESETS",
    "MethodSpec",
    "ModelShape",
    "PlanReport",
    "TrainingSetup",
    "check_fits",
    "count_parameters",
    "plan_command",
    "plan_stage",
    "plan_training",
    "preset_shape",
    "requirements_table",
    "suggest_change",
]
