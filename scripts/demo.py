"""`make demo`: the two-stage pipeline on the shipped sample data and a tiny model, then an answer
in-process and one over HTTP from Ray Serve.

Runs stage 1 (continued pretraining, full fine-tuning) and stage 2 (SFT with LoRA, merged at the
end) on 2 Ray Train workers with DeepSpeed ZeRO-2, prints the loss of every epoch and a generated
answer. Outputs go to runs/<run_name>/.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.config import load_config  # noqa: E402
from orchestrator.model.generate import generate_text, load_for_generation  # noqa: E402
from orchestrator.train.metrics_log import read_metrics  # noqa: E402
from orchestrator.layout import RunLayout# noqa: E402
from orchestrator.pipeline import run_pipeline# noqa: E402


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    run_name = time.strftime("demo-%Y%m%d-%H%M%S")
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"run_name={run_name}", *sys.argv[1:]])
    result = run_pipeline(config)
    print("\n=== loss per epoch ===")
    print(f"{'stage':<9}{'epoch':>6}{'train_loss':>12}{'eval_loss':>11}{'eval_ppl':>10}")
    for stage in result.stages:
        records = read_metrics(RunLayout.of(config).logs(stage.stage))
        last_train = {}
        for record in records:
            if "train_loss" in record:
                last_train[record["epoch"]] = record["train_loss"]
            if "eval_loss" in record:
                epoch = record["epoch"]
                train = f"{last_train[epoch]:.4f}" if epoch in last_train else "-"
                print(f"{stage.stage:<9}{epoch:>6}{train:>12}{record['eval_loss']:>11.4f}"
                      f"{record['eval_perplexity']:>10.1f}")
        print(f"{stage.stage}: {stage.data_stats['train_tokens']} training tokens, "
              f"{stage.metrics.get('tokens_per_s_run', 0):.0f} tokens/s, {stage.wall_seconds:.0f} s")
    model, tokenizer = load_for_generation(result.final_model)
    print("\n=== generated answers, in-process (final model: %s) ===" % result.final_model)
    for prompt in config.eval.prompts:
        answer = generate_text(model, tokenizer, prompt, config.eval.max_new_tokens, repetition_penalty=1.3)
        print(f"Q: {prompt}\nA: {answer.strip()}\n")
    serve_and_ask(config)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")


def serve_and_ask(config) -> None:
    """Serve the final model on 127.0.0.1 (Ray Serve), ask one chat question over HTTP, shut down."""
    import json
    import socket
    import urllib.request

    from ray import serve

    from orchestrator.serve.app import run_server

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
        print(f"=== over HTTP: POST {url}/v1/chat/completions ===")
        print(f"Q: {question}\nA: {answer['choices'][0]['message']['content'].strip()}")
        print(f"usage: {answer['usage']}\n")
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
