"""`ray job submit --working-dir . -- python jobs/pipeline.py --config configs/tiny.yaml [key=value ...]`

Also runs as `python jobs/pipeline.py --config …` (starts a local Ray). Same as `orchestrator pipeline`.
"""

from entry import run

if __name__ == "__main__":
    run("pipeline")
