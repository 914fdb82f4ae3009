"""`ray job submit --working-dir . -- python jobs/sft.py --config configs/tiny.yaml [key=value ...]`

Also runs as `python jobs/sft.py --config …` (starts a local Ray). Same as `orchestrator sft`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
