"""`ray job submit --working-dir . -- python jobs/serve.py --config configs/tiny.yaml [key=value ...]`

Deploys the OpenAI-compatible Serve application for the config's final model and keeps it up.
Same as `orchestrator serve`.
"""

from entry import run

if __name__ == "__main__":
    run("serve")
