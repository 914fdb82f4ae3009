"""Continuous batching (orchestrator/serve/continuous.py) on a tiny model, no Ray: requests that join a
running batch mid-decode answer token for token as they do alone, and every generation parameter holds."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from orchestrator.serve.engine import Completion, HFEngine, TextDeltas
from orchestrator.serve.protocol import GenerationParams

PROMPTS = ["The patient has a fever", "发烧时应该", "Drink water", "What should I do about", "合同是民事主体",
           "rest", "The doctor said the cough", "头疼"]


@pytest.fixture(scope="module")
def engine(small_tokenizer, tmp_path_factory):
    from orchestrator.config import TinyModelConfig
    from orchestrator.model.loading import create_tiny_model

    directory = tmp_path_factory.mktemp("tiny-model")
    model = create_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=256),
                              small_tokenizer, seed=0)
    model.save_pretrained(directory)
    small_tokenizer.save_pretrained(directory)
    torch.set_num_threads(1)
    return HFEngine(str(directory), device="cpu")


def run(batcher, requests):
    """Submit (prompt_ids, params) requests; each `after` index waits until that many tokens exist overall."""
    results, tokens, done = {}, queue.Queue(), threading.Event()
    events: dict[int, list] = {i: [] for i in range(len(requests))}

    def notify_for(i):
        def notify(event):
            events[i].append(event)
            if not isinstance(event, int):
                results[i] = event
                if len(results) == len(requests):
                    done.set()
            else:
                tokens.put(i)
        return notify

    for i, (ids, params) in enumerate(requests):
        batcher.submit(ids, params, notify_for(i))
        if i < len(requests) - 1:  # the next request arrives while this one is decoding
            for _ in range(2):
                tokens.get(timeout=60)
    assert done.wait(120)
    return results, events


def test_requests_joining_mid_decode_equal_unbatched_greedy(engine):
    params = [GenerationParams(max_new_tokens=n, do_sample=False) for n in (12, 20, 7, 16, 24, 5, 18, 10)]
    ids = [engine.encode(p, params[i]) for i, p in enumerate(PROMPTS)]
    alone = [engine.generate([ids[i]], params[i])[0] for i in range(len(ids))]
    batcher = engine.continuous(max_batch_size=8)
    results, _ = run(batcher, list(zip(ids, params)))
    assert [results[i] for i in range(len(ids))] == alone
    assert batcher.peak_rows >= 3  # requests really decoded together
    assert batcher._running == [] and batcher._cache is None  # everyone left the batch


def test_every_parameter_is_honoured_in_the_running_batch(engine):
    greedy = GenerationParams(max_new_tokens=16, do_sample=False)
    ids = engine.encode(PROMPTS[0], greedy)
    text = engine.generate([ids], greedy)[0].text
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip())
    sampled = GenerationParams(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=7)
    penalised = GenerationParams(max_new_tokens=16, do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2)
    requests = [(ids, GenerationParams(max_new_tokens=16, do_sample=False, stop=(stop,))),
                (ids, sampled), (ids, sampled), (ids, penalised),
                (ids, GenerationParams(max_new_tokens=8, do_sample=False, num_beams=3))]
    results, _ = run(engine.continuous(), requests)
    assert results[0].text == text[: text.find(stop)] and results[0].finish_reason == "stop"
    assert results[1] == results[2]  # the same seed gives the same answer, also inside a batch
    assert results[3] == engine.generate([ids], penalised)[0]
    assert results[4] == engine.generate([ids], requests[4][1])[0]  # beam search: one generate call


def test_text_deltas_concatenate_to_the_answer(engine):
    params = GenerationParams(max_new_tokens=20, do_sample=False)
    ids = engine.encode(PROMPTS[1], params)
    results, events = run(engine.continuous(), [(ids, params)])
    deltas = TextDeltas(engine, params)
    streamed = "".join(deltas.push(e) for e in events[0] if isinstance(e, int))
    final = events[0][-1]
    assert isinstance(final, Completion)
    assert streamed + deltas.last(final) == final.text == engine.generate([ids], params)[0].text
