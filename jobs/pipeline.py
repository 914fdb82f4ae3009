"""`ray job submit --working-dir . -- python jobs/pipeline.py --config configs/tiny.yaml [key=value ...]`

Also runs as `python jobs/pipeline.py --config …` (starts a local Ray). Same as `orchestrator pipeline`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
