"""`ray job submit --working-dir . -- python jobs/tune.py --config configs/tiny.yaml [--stage pretrain] [key=value ...]`

Also runs as `python jobs/tune.py --config …` (starts a local Ray). Same as `orchestrator tune`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
