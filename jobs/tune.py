"""`ray job submit --working-dir . -- python jobs/tune.py --config configs/tiny.yaml [--stage pretrain] [key=value ...]`

Also runs as `python jobs/tune.py --config …` (starts a local Ray). Same as `orchestrator tune`.
"""

from entry import run

if __name__ == "__main__":
    run("tune")
