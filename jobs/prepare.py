"""`ray job submit --working-dir . -- python jobs/prepare.py --config configs/tiny.yaml [--stage pretrain] [key=value ...]`

Prepares the stages' data on the cluster into the run's cached shard sets (what each stage does first).
Also runs as `python jobs/prepare.py --config …` (starts a local Ray). Same as `orchestrator prepare`.
"""

from entry import run

if __name__ == "__main__":
    run("prepare")
