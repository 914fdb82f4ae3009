"""What the command line shows. Quiet by default: one progress bar per long step, a summary per stage,
this library's warnings, errors in full. `--verbose`: every log line, Ray's worker output included.
Either way every log line of the driver also goes to the run's `logs/driver.log` (the workers write
`logs/<stage>/worker-<rank>.log`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional, TextIO

from orchestrator import progress

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_file_handlers: dict[str, logging.Handler] = {}
_STARTED = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
# Libraries that draw on the console themselves: transformers' own handler bypasses ours; tqdm bars of
# libraries (weights loading, Ray Data) are off (ours pass disable=False). Train workers on a local cluster
# inherit these.
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# Loggers with a console handler of their own (they do not propagate): below errors, their records go
# to the run's log files only.
_OWN_CONSOLE_LOGGERS = ("DeepSpeed",)


class _ToRunLogOnly(logging.Filter):
    """On a logger with its own console handler: errors pass; other records go to our log files instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        for handler in _file_handlers.values():
            handler.handle(record)
        return False


class _QuietConsole(logging.Filter):
    """Errors from anyone; warnings from this library (e.g. the memory plan) only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (
            record.levelno >= logging.WARNING and record.name.startswith("orchestrator"))


def configure_output(verbose: bool) -> Callable[[], None]:
    """Set this process's console up: quiet (progress bars) or verbose (every log line).

    Returns a function that undoes it (the CLI's `main` calls it when the command ends, so running
    `main` inside another program, a test or a job leaves that program's output as it was).
    """
    from orchestrator.runtime import is_quiet, quiet_ray

    root = logging.getLogger()
    saved = (root.level, list(root.handlers), progress.install(None), is_quiet(),
             {name: os.environ.get(name) for name in _QUIET_ENV})
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and \
                getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
            root.removeHandler(handler)  # a basicConfig console handler: ours replaces it
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(console)
    logging.captureWarnings(True)  # library warnings become log records: in the log file, quiet on screen
    if not verbose:
        console.addFilter(_QuietConsole())
        quiet_ray()
        for name, value in _QUIET_ENV.items():
            os.environ.setdefault(name, value)
        _hf_progress_bars(enabled=False)
        for name in _OWN_CONSOLE_LOGGERS:
            logging.getLogger(name).addFilter(_TO_RUN_LOG_ONLY)
        progress.install(ProgressBars(sys.stderr))

    def restore() -> None:
        level, handlers, listener, quiet, env = saved
        for handler in list(root.handlers):
            if handler not in handlers:  # ours: the console and the run's log files
                root.removeHandler(handler)
                handler.close()
        for path in [p for p, h in _file_handlers.items() if h not in handlers]:
            del _file_handlers[path]
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        progress.install(listener)
        if not verbose:
            _hf_progress_bars(enabled=True)
            for name in _OWN_CONSOLE_LOGGERS:
                logging.getLogger(name).removeFilter(_TO_RUN_LOG_ONLY)
        quiet_ray(quiet)
        logging.captureWarnings(False)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    return restore


_TO_RUN_LOG_ONLY = _ToRunLogOnly()


def _hf_progress_bars(enabled: bool) -> None:
    """transformers' bars (loading, writing shards) follow huggingface_hub's switch, read at its import:
    flip it when already imported (the environment variable covers a later import)."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if enabled else disable_progress_bars)()


def log_to_file(path: str) -> None:
    """Append every log line of this process to `path` too (once per path)."""
    if path in _file_handlers:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    _file_handlers[path] = handler


@contextlib.contextmanager
def run_log(layout: Any) -> Iterator[None]:
    """Every log line of a command on a run goes to the run's driver log. On remote storage the file
    is written in local scratch and copied to `<run>/logs/driver-<UTC time>-<pid>.log` when the command
    ends, failed or not: the log of a run stays with the run."""
    log_to_file(layout.driver_log)
    try:
        yield
    finally:
        if layout.is_remote:
            keep_driver_log(layout)


def remote_driver_log(layout: Any) -> str:
    """Where this process's driver log goes on remote storage (one file per command run)."""
    from orchestrator import storage

    return storage.join(layout.root, "logs", f"driver-{_STARTED}-{os.getpid()}.log")


def keep_driver_log(layout: Any) -> Optional[str]:
    """Copy the driver log to the run's remote logs/ (see run_log); returns its URI (None: nothing logged)."""
    from orchestrator import storage

    handler = _file_handlers.get(layout.driver_log)
    if handler is not None:
        handler.flush()
    if not os.path.exists(layout.driver_log):
        return None
    target = remote_driver_log(layout)
    try:
        with open(layout.driver_log, "rb") as handle:
            storage.write_bytes(target, handle.read())
    except Exception as exc:  # the command's own outcome matters more than its log's copy
        logging.getLogger("orchestrator.cli").warning("could not copy the driver log to %s: %s", target, exc)
        return None
    return target


class ProgressBars:
    """A progress.Listener: a live bar per step on a terminal, one line per finished step otherwise."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.live = stream.isatty()
        self._bars: dict[int, Any] = {}

    def begin(self, step: progress.Step) -> None:
        if not self.live:
            return
        from tqdm import tqdm

        self._bars[id(step)] = tqdm(total=step.total, desc=step.name, unit=step.unit, file=self.stream,
                                    dynamic_ncols=True, leave=False, disable=False,
                                    bar_format=None if step.total else "{desc}: {elapsed}{postfix}")

    def update(self, step: progress.Step) -> None:
        bar = self._bars.get(id(step))
        if bar is not None:
            bar.n = step.done
            bar.set_postfix(step.fields, refresh=False)
            bar.refresh()

    def end(self, step: progress.Step, ok: bool) -> None:
        bar = self._bars.pop(id(step), None)
        if bar is not None:
            bar.close()
        print(finished_line(step, ok), file=self.stream, flush=True)


def finished_line(step: progress.Step, ok: bool) -> str:
    """`✓ pretrain: train  40/40 steps  52.1 s  loss=2.1 eval_loss=2.3`."""
    count = f"  {step.done}/{step.total} {step.unit}s" if step.total else ""
    figures = " ".join(f"{k}={v}" for k, v in step.fields.items() if v is not None)
    return f"{'✓' if ok else '✗'} {step.name}{count}  {step.seconds:.1f} s  {figures}".rstrip()


def stage_summary(result: Any) -> list[str]:
    """A finished stage in a few lines: figures, then where its outputs are."""
    metrics, figures = result.metrics, []
    for key, label in (("train_loss", "train_loss"), ("eval_loss", "eval_loss"), ("eval_perplexity", "ppl")):
        if isinstance(metrics.get(key), (int, float)):
            figures.append(f"{label} {metrics[key]:.4f}" if key != "eval_perplexity" else f"{label} {metrics[key]:.1f}")
    if isinstance(metrics.get("tokens_per_s_run"), (int, float)):
        figures.append(f"{metrics['tokens_per_s_run']:.0f} tokens/s")
    tokens = result.data_stats.get("train_tokens")
    head = f"{result.stage}: {result.wall_seconds:.0f} s" + (f", {tokens} training tokens" if tokens else "")
    return [f"{head}; {', '.join(figures)}" if figures else head,
            f"  model       {result.model_uri}",
            f"  checkpoint  {result.checkpoint_uri}"]


def outputs_summary(layout: Any, eval_report: Optional[str] = None, tracking: Optional[str] = None) -> list[str]:
    """Where the rest of a run went: logs, the evaluation report, the tracking runs."""
    lines = [f"run         {layout.root}"]
    if layout.is_remote:
        lines.append(f"logs        {remote_driver_log(layout)}  (metrics.jsonl, TensorBoard and worker logs "
                     "travel in each checkpoint)")
    else:
        lines.append(f"logs        {layout.logs_root}/  (metrics.jsonl, TensorBoard, worker logs, driver.log)")
    if eval_report:
        lines.append(f"eval report {eval_report}")
    if tracking:
        lines.append(f"tracking    {tracking}")
    return lines


def run_summary(config: Any, result: Any) -> list[str]:
    """A finished run (a PipelineResult): each stage's figures and outputs, then where the rest went."""
    from orchestrator.layout import RunLayout
    from orchestrator.tracking import describe_run

    lines = [""]
    for stage in result.stages:
        lines.extend(stage_summary(stage))
    return lines + outputs_summary(RunLayout.of(config), result.eval_report, describe_run(config))
