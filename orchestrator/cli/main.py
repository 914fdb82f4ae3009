"""`orchestrator` / `python -m orchestrator` / `jobs/*.py`: parse, dispatch, turn library errors into exit codes."""

from __future__ import annotations

import logging
import sys
from typing import Optional

from orchestrator.cli.commands import run_command
from orchestrator.cli.parser import build_parser
from orchestrator.errors import OrchestratorError


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
