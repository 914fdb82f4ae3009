"""`ray job submit --working-dir . -- python jobs/pretrain.py --config configs/tiny.yaml [key=value ...]`

Also runs as `python jobs/pretrain.py --config …` (starts a local Ray). Same as `orchestrator pretrain`.
"""

from entry import run

if __name__ == "__main__":
    run("pretrain")
