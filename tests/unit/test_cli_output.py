"""The CLI's output: quiet filter, progress lines, summaries, restoring the process (orchestrator.cli.output)."""

from __future__ import annotations

import io
import logging
import os

from orchestrator import progress
from orchestrator.cli.output import ProgressBars, configure_output, finished_line, log_to_file, outputs_summary
from orchestrator.layout import RunLayout
from orchestrator.runtime import is_quiet


def test_quiet_console_shows_our_warnings_and_everyones_errors_only(capsys):
    restore = configure_output(verbose=False)
    try:
        logging.getLogger("orchestrator.plan").warning("plan does not fit")
        logging.getLogger("orchestrator.train").info("step 3 of 9")
        logging.getLogger("deepspeed").warning("a DeepSpeed banner")
        logging.getLogger("their_library.workers").error("worker group failed")  # a propagating logger
        # Ray's loggers print through a console handler of their own once ray is imported (they do not
        # propagate to ours): quiet keeps their errors on.
        assert logging.getLogger("ray.train").isEnabledFor(logging.ERROR)
        import warnings
        warnings.warn("torch_dtype is deprecated", FutureWarning)
        assert is_quiet() and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    finally:
        restore()
    err = capsys.readouterr().err
    assert "plan does not fit" in err and "worker group failed" in err
    assert "step 3 of 9" not in err and "DeepSpeed banner" not in err and "FutureWarning" not in err
    assert not is_quiet()


def test_verbose_shows_everything_and_the_run_log_keeps_everything(tmp_path, capsys):
    restore = configure_output(verbose=True)
    path = str(tmp_path / "logs" / "driver.log")
    try:
        log_to_file(path)
        logging.getLogger("deepspeed").info("a DeepSpeed banner")
        assert not is_quiet()
    finally:
        restore()
    assert "a DeepSpeed banner" in capsys.readouterr().err
    assert "a DeepSpeed banner" in open(path).read()
    logging.getLogger("deepspeed").warning("after the command")
    assert "after the command" not in open(path).read()  # the handler left with the command


def test_a_step_off_a_terminal_is_one_line_when_it_ends():
    stream = io.StringIO()
    previous = progress.install(ProgressBars(stream))
    try:
        with progress.step("pretrain: train", total=40, unit="step") as bar:
            for step in range(1, 41):
                bar.update(done=step, loss=2.5)
            bar.update(eval_loss=2.25)
    finally:
        progress.install(previous)
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("✓ pretrain: train  40/40 steps  ") and line.endswith("loss=2.5 eval_loss=2.25")


def test_a_failed_step_is_marked():
    step = progress.Step("sft: export model", None, "it", None)
    assert finished_line(step, ok=False).startswith("✗ sft: export model  ")


def test_outputs_summary_names_the_run_logs_report_and_tracking(tmp_path):
    lines = outputs_summary(RunLayout(str(tmp_path), "r"), "r/eval/report.md", "MLflow run abc")
    assert lines[0] == f"run         {tmp_path}/r"
    assert lines[1].startswith(f"logs        {tmp_path}/r/logs/")
    assert lines[2:] == ["eval report r/eval/report.md", "tracking    MLflow run abc"]


def test_deepspeeds_own_console_handler_is_kept_to_errors_and_the_rest_goes_to_the_run_log(tmp_path):
    own_console = io.StringIO()
    deepspeed = logging.getLogger("DeepSpeed")  # as DeepSpeed sets it up: its own handler, no propagation
    handler = logging.StreamHandler(own_console)
    deepspeed.addHandler(handler)
    deepspeed.propagate = False
    path = tmp_path / "driver.log"
    restore = configure_output(verbose=False)
    try:
        log_to_file(str(path))
        deepspeed.warning("Setting accelerator to CPU")
        deepspeed.error("cannot build op")
    finally:
        restore()
    try:
        assert own_console.getvalue().splitlines() == ["cannot build op"]
        assert "Setting accelerator to CPU" in path.read_text()
        deepspeed.warning("after the command")
        assert "after the command" in own_console.getvalue()  # the filter left with the command
    finally:
        deepspeed.removeHandler(handler)
