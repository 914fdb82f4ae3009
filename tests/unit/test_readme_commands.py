"""Every `orchestrator …` and `python jobs/<command>.py …` line of the README's shell blocks parses with the
real parser, and those that need no cluster or training (config, plan, runs …) run and succeed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[2]
RUNNABLE = {"config", "plan", "runs"}  # need neither Ray nor a trained run (runs: local paths only)


def readme_commands() -> list[list[str]]:
    """argv of each orchestrator command in the README's ```bash blocks (jobs/<x>.py lines as `x …`)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["orchestrator"]:
                commands.append(words[1:])
            elif "--" in words and any(re.fullmatch(r"jobs/\w+\.py", w) for w in words):
                script = next(i for i, w in enumerate(words) if re.fullmatch(r"jobs/\w+\.py", w))
                commands.append([Path(words[script]).stem, *words[script + 1:]])
    return commands


COMMANDS = readme_commands()
# Runnable here: the commands above that read only files of this repository (`my.yaml` stands for yours).
RUN_HERE = [c for c in COMMANDS if c[0] in RUNNABLE and not any(w.startswith("s3://") for w in c)
            and all((ROOT / c[i + 1]).is_file() for i, word in enumerate(c) if word in ("--config", "-c"))]


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 25
    assert ["config", "show", "--config", "configs/tiny.yaml", "distributed.zero_stage=3"] in RUN_HERE
    assert len(RUN_HERE) >= 5


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(argv):
    build_parser().parse_args(argv)  # argparse exits (SystemExit) on anything it does not accept


@pytest.mark.parametrize("argv", RUN_HERE, ids=[" ".join(c)[:60] for c in RUN_HERE])
def test_readme_command_runs(argv, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(argv) in (0, 1), capsys.readouterr().err  # plan: 1 = does not fit, which is an answer
    assert capsys.readouterr().out.strip()
