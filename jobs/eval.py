"""`ray job submit --working-dir . -- python jobs/eval.py --config configs/tiny.yaml [--model DIR_OR_URI] [--out DIR]`

Evaluates the run's models (or the given ones) on the config's `eval:` sets over the cluster and
writes the report. Same as `orchestrator eval`.
"""

from entry import run

if __name__ == "__main__":
    run("eval")
