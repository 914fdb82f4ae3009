"""`ray job submit --working-dir . -- python jobs/serve.py --config configs/tiny.yaml [key=value ...]`

Deploys the OpenAI-compatible Serve application for the config's final model and keeps it up.
Same as `orchestrator serve`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
