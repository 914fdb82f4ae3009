"""`ray job submit --working-dir . -- python jobs/preference.py --config configs/tiny-preference.yaml [key=value ...]`

Also runs as `python jobs/preference.py --config …` (starts a local Ray). Same as `orchestrator preference`.
"""

from entry import run

if __name__ == "__main__":
    run("preference")
