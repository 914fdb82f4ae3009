"""What every model is asked, and how its responses become metrics. Pure: no model, no Ray.

`build_requests` turns the loaded sets into request rows of three kinds, the only things a model
replica knows how to do (see `scoring.score_batch`):

* `generate`: answer chat messages (QA items, honesty probes);
* `loglik`: log-likelihood of each continuation after chat messages (multiple-choice options, the chosen
  and rejected answers of preference pairs);
* `nll`: negative log-likelihood of a document (perplexity).

`summarise` turns one model's responses into its metrics and per-item details.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from orchestrator.config import MultipleChoiceSetConfig
from orchestrator.evaluation import metrics
from orchestrator.evaluation.sets import ChoiceItem, EvalSets

GENERATE, LOGLIK, NLL = "generate", "loglik", "nll"
# Which way is better, for the report: perplexity and bits per character fall, every other metric rises.
LOWER_IS_BETTER = ("perplexity", "bits_per_char")


def request(key: str, task: str, payload: dict[str, Any]) -> dict[str, str]:
    """One request row (payload as JSON text, so every row has the same Arrow schema)."""
    return {"key": key, "task": task, "payload": json.dumps(payload, ensure_ascii=False)}


def choice_request(item: ChoiceItem, config: MultipleChoiceSetConfig) -> dict[str, str]:
    """letter: the question with every option listed, continued by each label ("A", "B", ...);
    option_text: the question alone, continued by each option's text."""
    lines = [config.instruction] if config.instruction else []
    lines.append(item.question)
    if config.scoring == "letter":
        lines.extend(f"{label}. {text}" for label, text in item.options)
        continuations = [label for label, _ in item.options]
    else:
        continuations = [text for _, text in item.options]
    return request(item.key, LOGLIK, {"messages": [["user", "\n".join(lines)]], "continuations": continuations})


def build_requests(sets: EvalSets) -> list[dict[str, str]]:
    """Every request of an evaluation, the same for every model."""
    rows = []
    for items in sets.qa.values():
        rows.extend(request(item.key, GENERATE, {"messages": [list(m) for m in item.messages]}) for item in items)
    for config, items in sets.multiple_choice.values():
        rows.extend(choice_request(item, config) for item in items)
    rows.extend(request(probe.key, GENERATE, {"messages": [["user", probe.question]]}) for probe in sets.probes)
    rows.extend(request(f"perplexity#{i}", NLL, {"text": doc.text}) for i, doc in enumerate(sets.documents))
    rows.extend(request(f"preference#{i}", LOGLIK, {"messages": [[m.role, m.content] for m in pair.prompt],
                                                    "continuations": [pair.chosen, pair.rejected]})
                for i, pair in enumerate(sets.pairs))
    return rows


@dataclass
class ModelScores:
    """One model's results: metric name → value, and per-item details keyed like the requests."""

    metrics: dict[str, float] = field(default_factory=dict)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    truncated_prompts: int = 0


def option_scores(response: dict[str, Any], scoring: str) -> list[float]:
    """letter: each label's log-likelihood; option_text: each option's log-likelihood per token
    (so long options are not penalised for their length)."""
    if scoring == "letter":
        return list(response["logliks"])
    return [ll / max(n, 1) for ll, n in zip(response["logliks"], response["tokens"])]


def summarise(sets: EvalSets, responses: dict[str, dict[str, Any]], refusal_patterns: Sequence[str]) -> ModelScores:
    """Metrics of one model from its responses to `build_requests(sets)`."""
    scores = ModelScores()
    scores.truncated_prompts = sum(1 for r in responses.values() if r.get("truncated"))
    if sets.documents:
        nll = sum(responses[f"perplexity#{i}"]["nll"] for i in range(len(sets.documents)))
        tokens = sum(responses[f"perplexity#{i}"]["tokens"] for i in range(len(sets.documents)))
        chars = sum(len(doc.text) for doc in sets.documents)
        scores.metrics["perplexity"] = metrics.perplexity(nll, tokens)
        scores.metrics["bits_per_char"] = metrics.bits_per_character(nll, chars)
    for name, items in sets.qa.items():
        per_metric: dict[str, list[float]] = {"char_f1": [], "rouge_l": [], "exact_match": []}
        for item in items:
            answer = responses[item.key]["text"]
            detail = {"answer": answer, "char_f1": metrics.char_f1(answer, item.reference),
                      "rouge_l": metrics.rouge_l(answer, item.reference),
                      "exact_match": metrics.exact_match(answer, item.reference)}
            for metric in per_metric:
                per_metric[metric].append(detail[metric])
            scores.items[item.key] = detail
        for metric, values in per_metric.items():
            scores.metrics[f"qa/{name}/{metric}"] = metrics.mean(values)
    for name, (config, items) in sets.multiple_choice.items():
        correct = []
        for item in items:
            option_values = option_scores(responses[item.key], config.scoring)
            picked = item.options[metrics.pick_option(option_values)][0]
            correct.append(1.0 if picked == item.answer else 0.0)
            scores.items[item.key] = {"picked": picked, "answer": item.answer, "scores": option_values}
        scores.metrics[f"mc/{name}/accuracy"] = metrics.mean(correct)
    if sets.probes:
        patterns = metrics.compile_patterns(refusal_patterns)
        refused = []
        for probe in sets.probes:
            answer = responses[probe.key]["text"]
            declined = metrics.is_refusal(answer, patterns)
            refused.append(1.0 if declined else 0.0)
            scores.items[probe.key] = {"answer": answer, "refused": declined}
        scores.metrics["honesty/refusal_rate"] = metrics.mean(refused)
    if sets.pairs:
        wins, margins = [], []
        for i in range(len(sets.pairs)):
            chosen, rejected = option_scores(responses[f"preference#{i}"], "option_text")  # mean per token
            wins.append(1.0 if chosen > rejected else 0.0)
            margins.append(chosen - rejected)
            scores.items[f"preference#{i}"] = {"chosen": chosen, "rejected": rejected}
        scores.metrics["preference/accuracy"] = metrics.mean(wins)
        scores.metrics["preference/margin"] = metrics.mean(margins)
    return scores
