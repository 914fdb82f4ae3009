"""`ray job submit --working-dir . -- python jobs/eval.py --config configs/tiny.yaml [--model DIR_OR_URI] [--out DIR]`

Evaluates the run's models (or the given ones) on the config's `eval:` sets over the cluster and
writes the report. Same as `orchestrator eval`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
