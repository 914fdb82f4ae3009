"""`make demo`: the two-stage pipeline on the shipped sample data and a tiny model, then an answer
over HTTP from Ray Serve.

Runs stage 1 (continued pretraining, full fine-tuning) and stage 2 (SFT with LoRA, merged at the
end) on 2 Ray Train workers with DeepSpeed ZeRO-2, prints the loss of every epoch, where the outputs
went (runs/<run_name>/) and the answer Ray Serve gives over HTTP. `--verbose` shows every log line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.cli.output import configure_output, log_to_file, run_summary  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.layout import RunLayout  # noqa: E402


def main() -> int:
    """`python scripts/demo.py [--verbose] [key=value ...]`: quiet (progress bars) unless --verbose."""
    args = sys.argv[1:]
    configure_output(verbose="--verbose" in args)  # before torch, DeepSpeed and Ray are imported
    from orchestrator.pipeline import run_pipeline

    started = time.perf_counter()
    run_name = time.strftime("demo-%Y%m%d-%H%M%S")
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"run_name={run_name}", *(a for a in args if a != "--verbose")])
    log_to_file(RunLayout.of(config).driver_log)
    result = run_pipeline(config)
    print_loss_table(config, result)
    print("\n".join(run_summary(config, result)))
    serve_and_ask(config)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


def print_loss_table(config, result) -> None:
    """Train loss (last logged step of the epoch) and eval loss / perplexity of every epoch of every stage."""
    from orchestrator.train.metrics_log import read_metrics

    print(f"\n{'stage':<9}{'epoch':>6}{'train_loss':>12}{'eval_loss':>11}{'eval_ppl':>10}")
    for stage in result.stages:
        last_train = {}
        for record in read_metrics(RunLayout.of(config).logs(stage.stage)):
            if "train_loss" in record:
                last_train[record["epoch"]] = record["train_loss"]
            if "eval_loss" in record and record.get("epoch"):
                epoch = record["epoch"]
                train = f"{last_train[epoch]:.4f}" if epoch in last_train else "-"
                print(f"{stage.stage:<9}{epoch:>6}{train:>12}{record['eval_loss']:>11.4f}"
                      f"{record['eval_perplexity']:>10.1f}")


def serve_and_ask(config) -> None:
    """Serve the final model on 127.0.0.1 (Ray Serve), ask one chat question over HTTP, shut down."""
    import json
    import os
    import socket
    import urllib.request

    import ray
    from ray import serve

    from orchestrator.runtime import quiet_serve_logger
    from orchestrator.serve.app import run_server

    quiet_serve_logger()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = config.model_copy(update={"serve": config.serve.model_copy(update={"host": "127.0.0.1", "port": port})})
    url = run_server(config, blocking=False)
    try:
        question = config.eval.prompts[0] if config.eval.prompts else "发烧时应该怎么办？"
        body = {"model": config.run_name, "messages": [{"role": "user", "content": question}],
                "max_tokens": config.eval.max_new_tokens, "temperature": 0, "repetition_penalty": 1.3}
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        print(f"\nserved: POST {url}/v1/chat/completions")
        print(f"Q: {question}\nA: {answer['choices'][0]['message']['content'].strip()}")
        print(f"usage: {answer['usage']}")
    finally:
        if os.environ.get("RAY_ADDRESS"):  # someone else's cluster: take down only what the demo started there
            serve.shutdown()
        else:  # the local cluster this process started goes with it (Serve's own shutdown logs a failed retry)
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
