"""Plan reports and requirement tables as text or Markdown (strings; the CLI prints them)."""

from __future__ import annotations

from orchestrator.plan.memory import GIB, PRECISION_LABELS, korthikanti_layer_bytes
from orchestrator.plan.planner import PlanReport, RequirementsTable

MIB = 2**20


def _gib(value: float) -> str:
    return f"{value / GIB:,.2f}"


def _unit(total: float) -> tuple[str, float]:
    """GiB for real models, MiB for tiny ones."""
    return ("GiB", GIB) if total >= GIB else ("MiB", MIB)


def _flops(value: float) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value:,.0f} FLOP"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _headline(report: PlanReport) -> list[str]:
    s, shape, counts = report.setup, report.shape, report.counts
    share = 100 * counts.trainable / max(counts.total, 1)
    offload = [name for name, on in (("optimizer", s.offload_optimizer), ("params", s.offload_params)) if on]
    device = "GPUs" if s.on_gpu else "CPU workers"
    return [
        f"stage {report.stage}: {shape.name}, {_count(counts.total)} parameters, {s.method.label}, "
        f"{_count(counts.trainable)} trainable ({share:.3g}%)",
        f"{PRECISION_LABELS[s.precision]}; ZeRO-{s.zero_stage}"
        + (f" with {' and '.join(offload)} offload" if offload else "")
        + f"; {s.world_size} {device} ({s.nodes} node{'s' if s.nodes > 1 else ''} x {s.gpus_per_node}); "
        f"micro-batch {s.micro_batch} x {s.seq_len} tokens, accumulation {s.gradient_accumulation}; "
        f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}; attention {s.attention}",
    ]


def _verdict(report: PlanReport) -> str:
    total, budget = report.memory.total, report.budget_bytes
    if not report.gpu_fits:
        return f"DOES NOT FIT: {_gib(total)} GiB needed, {report.setup.gpu_memory_gib:g} GiB available"
    if not report.host_fits:
        return (f"DOES NOT FIT in host memory: {_gib(report.memory.cpu_per_node)} GiB per node needed, "
                f"plan.host_memory_gib={report.setup.host_memory_gib:g}")
    return f"FITS: {_gib(total)} of {report.setup.gpu_memory_gib:g} GiB ({100 * total / budget:.1f}%)"


def _suggestion_lines(report: PlanReport) -> list[str]:
    suggestion = report.suggestion
    if suggestion is None:
        return []
    if not suggestion.fits:
        return [
            "no change the planner tries makes it fit (tried: " + "; ".join(suggestion.changes or ("nothing",))
            + f" -> {_gib(suggestion.total_bytes)} GiB); use larger GPUs, a shorter sequence or a smaller model"
        ]
    return [
        "cheapest change that fits: " + "; ".join(suggestion.changes)
        + f" -> {_gib(suggestion.total_bytes)} GiB per worker"
    ]


def _speed_lines(report: PlanReport) -> list[str]:
    t, s = report.throughput, report.setup
    f = t.flops_per_token
    lines = [
        f"{_flops(f.total)} per token (forward {_flops(f.forward)}, backward {_flops(f.backward)}, "
        f"recompute {_flops(f.recompute)}) at MFU {s.mfu:g} of {s.peak_tflops:g} TFLOP/s per GPU"
        + ("" if s.on_gpu else " (GPU figures: set plan.peak_tflops to the CPU's for CPU workers)"),
        f"optimizer step: {t.tokens_per_step:,} tokens in {_duration(t.step_seconds)}"
        + (f" (offload transfers {_duration(t.offload_seconds)})" if t.offload_seconds else "")
        + f"; {t.tokens_per_second:,.0f} tokens/s",
    ]
    if t.wall_seconds is not None:
        lines.append(
            f"{s.dataset_tokens:,} tokens x {s.epochs} epoch(s): {t.optimizer_steps:,} steps, "
            f"wall time {_duration(t.wall_seconds)}, {t.gpu_hours:,.1f} GPU-hours"
        )
    else:
        lines.append("wall time and GPU-hours: pass --tokens N (the stage's dataset size in tokens)")
    return lines


def _activation_line(report: PlanReport) -> str:
    a, s, shape = report.memory.activation_detail, report.setup, report.shape
    reference = korthikanti_layer_bytes(s.seq_len, s.micro_batch, shape.hidden_size, shape.num_heads)
    return (
        f"activations per layer: {a.per_layer / MIB:,.1f} MiB without checkpointing, "
        f"{a.per_layer_checkpointed / MIB:,.1f} MiB with; {a.recording_layers} layers record "
        f"(Korthikanti GPT-layer reference sbh(34+5as/h): {reference / MIB:,.1f} MiB)"
    )


def render_report(report: PlanReport, markdown: bool = False) -> str:
    """A plan report: headline, per-worker memory breakdown, verdict, suggestion, speed, notes."""
    m = report.memory
    unit, size = _unit(m.total)
    rows = [(label, f"{value / size:,.2f}") for label, value in m.items() if value > 0]
    total = f"{m.total / size:,.2f}"
    cpu_unit, cpu_size = _unit(m.cpu_per_node)
    cpu = (
        f"CPU memory per node: {m.cpu_per_node / cpu_size:,.2f} {cpu_unit} "
        "(DeepSpeed's estimate: loading the model or the offloaded states, x1.5)"
        + (f", of plan.host_memory_gib={report.setup.host_memory_gib:g} GiB" if report.setup.host_memory_gib else "")
    )
    if markdown:
        lines = [f"### Plan: stage `{report.stage}`", "", *(f"- {line}" for line in _headline(report)), ""]
        lines += [f"| memory per worker | {unit} |", "| --- | ---: |"]
        lines += [f"| {label} | {value} |" for label, value in rows]
        lines += [f"| **total** | **{total}** |", "", f"**{_verdict(report)}**", ""]
        details = [*_suggestion_lines(report), cpu, _activation_line(report), *_speed_lines(report)]
        lines += [f"- {line}" for line in details]
        lines += [f"- note: {note}" for note in report.notes]
        return "\n".join(lines)
    width = max(len(label) for label, _ in rows) + 2
    lines = [*_headline(report), "", f"{'memory per worker':<{width}}{unit:>10}"]
    lines += [f"  {label:<{width - 2}}{value:>10}" for label, value in rows]
    lines += [f"  {'total':<{width - 2}}{total:>10}", _verdict(report)]
    lines += _suggestion_lines(report)
    lines += [cpu, _activation_line(report), *_speed_lines(report)]
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def render_table(table: RequirementsTable, markdown: bool = False) -> str:
    """The requirements table (GiB per GPU), with the settings it assumes in its caption."""
    caption = (
        f"Estimated peak memory per GPU (GiB): 1 GPU, no ZeRO partitioning, micro-batch {table.micro_batch} x "
        f"{table.seq_len} tokens, gradient checkpointing {'on' if table.gradient_checkpointing else 'off'}, "
        "SDPA attention, AdamW"
    )
    names = [shape.name for shape in table.columns]
    cells = [[f"{value / GIB:,.1f}" for value in row] for row in table.bytes]
    if markdown:
        lines = [caption, "", "| Method | Bits | " + " | ".join(names) + " |"]
        lines.append("| --- | ---: | " + " | ".join("---:" for _ in names) + " |")
        for row, values in zip(table.rows, cells):
            lines.append(f"| {row.label} | {row.bits} | " + " | ".join(values) + " |")
        return "\n".join(lines)
    label_width = max(len(row.label) for row in table.rows) + 2
    col = max(10, *(len(n) + 2 for n in names))
    lines = [caption, f"{'method':<{label_width}}{'bits':>5}" + "".join(f"{n:>{col}}" for n in names)]
    for row, values in zip(table.rows, cells):
        lines.append(f"{row.label:<{label_width}}{row.bits:>5}" + "".join(f"{v:>{col}}" for v in values))
    return "\n".join(lines)
