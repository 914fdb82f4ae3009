"""`ray job submit --working-dir . -- python jobs/sft.py --config configs/tiny.yaml [key=value ...]`

Also runs as `python jobs/sft.py --config …` (starts a local Ray). Same as `orchestrator sft`.
"""

from entry import run

if __name__ == "__main__":
    run("sft")
