"""`orchestrator plan`: the plan of each stage and the requirements table, rendered (text or Markdown)."""

from __future__ import annotations

from typing import Optional

from orchestrator.config import PipelineConfig
from orchestrator.errors import ConfigError
from orchestrator.plan.model_shape import PRESETS, preset_shape, shape_from_model_dir
from orchestrator.plan.planner import default_plan_config, model_shape_for, plan_stage, requirements_table
from orchestrator.plan.render import render_report, render_table


def plan_command(
    config: Optional[PipelineConfig],
    *,
    overrides: Optional[list[str]] = None,
    stages: Optional[list[str]] = None,
    preset: Optional[str] = None,
    model_dir: Optional[str] = None,
    tokens: Optional[int] = None,
    method: Optional[str] = None,
    precision: Optional[str] = None,
    markdown: bool = False,
) -> tuple[str, bool]:
    """What `orchestrator plan` prints, and False when a stage does not fit and `plan.strict` is on.

    Without a config, a default one (GPU workers, an `sft` stage) takes `overrides`. The model is
    `preset` or `model_dir` when given, else the config's. Each stage (default: all the config has)
    gets a breakdown; the requirements table follows, for this model and the presets.
    """
    if preset is not None and model_dir is not None:
        raise ConfigError("give either --preset or --model-dir, not both")
    if config is None:
        if preset is None and model_dir is None:
            raise ConfigError("nothing to plan: give --config, --preset or --model-dir")
        config = default_plan_config(overrides, stages)
    if preset is not None:
        shape = preset_shape(preset)
    elif model_dir is not None:
        shape = shape_from_model_dir(model_dir)
    else:
        shape = model_shape_for(config)
    names = stages or [name for name in ("pretrain", "sft", "preference") if getattr(config, name) is not None]
    if not names:
        raise ConfigError("the config has no `pretrain:` or `sft:` section to plan")
    reports = [
        plan_stage(config, name, shape=shape, tokens=tokens, method=method, precision=precision) for name in names
    ]
    columns = tuple(PRESETS.values())
    if shape not in columns:
        columns = (shape, *columns)
    first = reports[0].setup
    table = requirements_table(
        columns, seq_len=first.seq_len, micro_batch=1, gradient_checkpointing=True,
        lora_rank=first.method.lora_rank,
    )
    parts = [render_report(report, markdown=markdown) for report in reports]
    parts.append(render_table(table, markdown=markdown))
    ok = all(report.fits for report in reports) or not config.plan.strict
    return "\n\n".join(parts) + "\n", ok
