"""What every `jobs/*.py` does: run one `orchestrator` command with the script's arguments.

A job runs from a checkout that may not be installed (`ray job submit --working-dir .` ships
the directory; a plain `python jobs/x.py` from a clone): the checkout root is put on the path
here, once, for all of them.
"""

import os
import sys


def run(command: str) -> None:
    """`python jobs/<command>.py ARGS…` == `orchestrator <command> ARGS…`; exits with its code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from orchestrator.cli.main import main  # importable only once the checkout is on the path

    sys.exit(main([command, *sys.argv[1:]]))
