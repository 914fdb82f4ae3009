"""`orchestrator` / `python -m orchestrator` / `jobs/*.py`: parse, dispatch, turn library errors into exit codes."""

from __future__ import annotations

import sys
from typing import Optional

from orchestrator.cli.commands import run_command
from orchestrator.cli.output import configure_output
from orchestrator.cli.parser import build_parser
from orchestrator.errors import OrchestratorError


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    restore_output = configure_output(args.verbose)
    try:
        return run_command(args)
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        restore_output()


if __name__ == "__main__":
    sys.exit(main())
