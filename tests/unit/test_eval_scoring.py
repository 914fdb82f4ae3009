"""One model answering evaluation requests (no Ray): option log-likelihoods, multiple-choice picks on a
model trained to always answer "B", document perplexity, generation with prompts cut to the context."""

from __future__ import annotations

import json
import random

import pytest
import torch

from orchestrator.config import MultipleChoiceSetConfig, TinyModelConfig
from orchestrator.data.templates import prompt_for_generation, select_template
from orchestrator.errors import ConfigError
from orchestrator.evaluation.scoring import ModelScorer, ScorerSettings, score_batch
from orchestrator.evaluation.sets import ChoiceItem, EvalSets
from orchestrator.evaluation.tasks import build_requests, choice_request, option_scores, summarise
from orchestrator.model.loading import create_tiny_model
from orchestrator.serve.protocol import GenerationParams

WORDS = ["fever", "water", "rest", "doctor", "cough", "cold", "patient", "headache", "drink", "see"]
GREEDY = GenerationParams(max_new_tokens=4, do_sample=False)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Models this small run faster on one thread, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def random_model_dir(small_tokenizer, tmp_path_factory):
    tiny = TinyModelConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=64)
    return _save(create_tiny_model(tiny, small_tokenizer, seed=3), small_tokenizer, tmp_path_factory.mktemp("m"))


def _choice_items(n: int, seed: int) -> list[ChoiceItem]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(3)) + "?"
        options = tuple((label, rng.choice(WORDS)) for label in "ABCD")
        items.append(ChoiceItem(f"mc#{i}", question, options, "ABCD"[i % 4], "test"))
    return items


def _train_always_b(tokenizer, config: MultipleChoiceSetConfig):
    """A tiny LLaMA trained (plain torch, loss on the answer token only) to answer every question with B."""
    template = select_template("auto", tokenizer)
    answer_id = tokenizer("B", add_special_tokens=False)["input_ids"]
    assert len(answer_id) == 1
    examples = []
    for item in _choice_items(32, seed=0):
        messages = json.loads(choice_request(item, config)["payload"])["messages"]
        prompt = tokenizer(prompt_for_generation(template, [tuple(m) for m in messages]),
                           add_special_tokens=False)["input_ids"]
        examples.append(prompt + answer_id)
    model = create_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=256),
                              tokenizer, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    longest = max(len(e) for e in examples)
    ids = torch.full((len(examples), longest), tokenizer.pad_token_id)
    labels = torch.full((len(examples), longest), -100)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, example in enumerate(examples):
        ids[i, : len(example)] = torch.tensor(example)
        mask[i, : len(example)] = 1
        labels[i, len(example) - 1] = example[-1]
    model.train()
    for _ in range(40):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05, f"the tiny model did not learn to answer B (loss {loss.item():.3f})"
    return model.eval()


def test_multiple_choice_picks_the_option_the_model_prefers(small_tokenizer, tmp_path):
    config = MultipleChoiceSetConfig(name="mc", path="unused.csv")
    model_dir = _save(_train_always_b(small_tokenizer, config), small_tokenizer, tmp_path / "always-b")
    scorer = ModelScorer.load(model_dir, ScorerSettings(GREEDY, batch_size=8))
    held_out = _choice_items(12, seed=1)  # answers cycle A, B, C, D: a quarter are B
    sets = EvalSets(qa={}, multiple_choice={"mc": (config, held_out)}, probes=[], documents=[])
    responses = {r["key"]: json.loads(r["result"]) for r in score_batch(scorer, build_requests(sets))}
    scores = summarise(sets, responses, [])
    assert [scores.items[i.key]["picked"] for i in held_out] == ["B"] * 12
    assert scores.metrics["mc/mc/accuracy"] == pytest.approx(3 / 12)
    for item in held_out:  # B is not merely first among equals: it wins by a margin
        a, b, c, d = scores.items[item.key]["scores"]
        assert b > max(a, c, d) + 1.0


def test_option_log_likelihoods_match_the_model_and_normalise_by_tokens(random_model_dir):
    scorer = ModelScorer.load(random_model_dir, ScorerSettings(GREEDY, batch_size=2))
    messages = [["user", "fever and cough?"]]
    continuations = ["drink water", "B", "see a doctor"]
    result = scorer.loglikelihoods(messages, continuations)
    tokenizer, model = scorer.tokenizer, scorer.engine.model
    context = tokenizer(scorer.engine.chat_prompt([("user", "fever and cough?")]), add_special_tokens=False)["input_ids"]
    for text, loglik, count in zip(continuations, result["logliks"], result["tokens"]):
        cont = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        expected = sum(logprobs[len(context) - 1 + j, token].item() for j, token in enumerate(cont))
        assert loglik == pytest.approx(expected, abs=1e-4)
        assert count == len(cont)
    assert option_scores(result, "option_text") == pytest.approx([ll / n for ll, n in zip(result["logliks"],
                                                                                          result["tokens"])])
    assert option_scores({"logliks": [-4.0, -3.0], "tokens": [4, 1]}, "option_text") == [-1.0, -3.0]
    assert option_scores({"logliks": [-4.0, -3.0], "tokens": [4, 1]}, "letter") == [-4.0, -3.0]


def test_document_perplexity_scores_every_token_after_the_first_once(random_model_dir):
    scorer = ModelScorer.load(random_model_dir, ScorerSettings(GREEDY, block_size=8, batch_size=3))
    tokenizer, model = scorer.tokenizer, scorer.engine.model
    short, long = "Drink water.", "The patient has a fever and a cough; drink water, rest, and see a doctor."
    results = scorer.document_nll([short, long])
    for text, result in zip((short, long), results):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert result["tokens"] == len(ids) - 1
        expected = 0.0
        for start in range(0, len(ids) - 1, 7):  # windows of 8 overlapping by one token
            window = torch.tensor([ids[start : start + 8]])
            with torch.no_grad():
                expected += model(window, labels=window).loss.item() * (window.shape[1] - 1)
        assert result["nll"] == pytest.approx(expected, rel=1e-4)
    assert len(tokenizer(long)["input_ids"]) > 8  # the long one really spans several windows


def test_generation_cuts_long_prompts_and_score_batch_keeps_the_order(random_model_dir):
    scorer = ModelScorer.load(random_model_dir, ScorerSettings(GREEDY, block_size=16, batch_size=2))
    rows = [
        {"key": "q0", "task": "generate", "payload": json.dumps({"messages": [["user", "fever?"]]})},
        {"key": "d0", "task": "nll", "payload": json.dumps({"text": "drink water"})},
        {"key": "q1", "task": "generate", "payload": json.dumps({"messages": [["user", "cough " * 80]]})},
        {"key": "c0", "task": "loglik", "payload": json.dumps({"messages": [["user", "x?"]], "continuations": ["A"]})},
    ]
    out = score_batch(scorer, rows)
    assert [r["key"] for r in out] == ["q0", "d0", "q1", "c0"]
    results = [json.loads(r["result"]) for r in out]
    assert results[0]["truncated"] is False and results[2]["truncated"] is True  # context is 64 tokens
    assert isinstance(results[0]["text"], str) and results[0]["tokens"] <= 4
    assert results[1]["tokens"] > 0 and len(results[3]["logliks"]) == 1
    too_long = ModelScorer.load(random_model_dir, ScorerSettings(GenerationParams(max_new_tokens=64, do_sample=False)))
    with pytest.raises(ConfigError, match="eval.generation.max_tokens=64 leaves no room"):
        too_long.generate([[["user", "hi"]]])


def test_a_prompt_tuning_adapter_is_scored_on_the_base_it_names(random_model_dir, small_tokenizer, tmp_path):
    from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from orchestrator.model.export import adapter_base

    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(random_model_dir),
                           PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    torch.nn.init.normal_(tuned.prompt_encoder["default"].embedding.weight, std=1.0)  # not the identity
    adapter_dir = tmp_path / "adapter"
    tuned.save_pretrained(adapter_dir)
    small_tokenizer.save_pretrained(adapter_dir)
    assert adapter_base(str(adapter_dir)) == random_model_dir and adapter_base(random_model_dir) is None

    scorer = ModelScorer.load(str(adapter_dir), ScorerSettings(GREEDY), base_dir=adapter_base(str(adapter_dir)))
    plain = ModelScorer.load(random_model_dir, ScorerSettings(GREEDY))
    messages, continuations = [["user", "fever?"]], ["drink water", "rest"]
    result = scorer.loglikelihoods(messages, continuations)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(random_model_dir), adapter_dir).eval()
    context = small_tokenizer(scorer.engine.chat_prompt([("user", "fever?")]), add_special_tokens=False)["input_ids"]
    for text, loglik in zip(continuations, result["logliks"]):
        cont = small_tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([context + cont])).logits[0, 4:]  # after the virtual tokens
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        assert loglik == pytest.approx(sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(cont)),
                                       abs=1e-4)
    assert result["logliks"] != pytest.approx(plain.loglikelihoods(messages, continuations)["logliks"])
    assert isinstance(scorer.generate([messages])[0]["text"], str)
