"""One OpenAI-API conformance suite for both serving engines (serve.engine: hf and vllm), over real HTTP.

A test module that serves an engine defines a module-scoped `served` fixture — a dict with the server's `url`,
the served model's `name` and its `model_dir` — started with the API keys `OTHER_KEY,KEY`,
`max_tokens_limit: 200` and two adapters, and subclasses `OpenAIConformance` (pytest collects the inherited
tests as that module's, on that module's server):

    class TestConformance(OpenAIConformance):
        pass

What one engine answers differently from the other (the HF engine's beam search, vLLM's adapter loading)
stays in that engine's module.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

KEY = "sk-orchestrator-test-key"
OTHER_KEY = "other-key"
API_KEYS = f"{OTHER_KEY},{KEY}"  # the value of the served config's api_keys_env
MAX_TOKENS_LIMIT = 200


def post(served, path: str, body, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(served["url"] + path, content=raw, headers={**headers, "Content-Type": "application/json"},
                          timeout=120)
    return httpx.post(served["url"] + path, json=body, headers=headers, timeout=120)


def openai_client(served):
    import openai

    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def offline_greedy(model_dir: str, prompt: str, max_new: int, adapter: str | None = None) -> str:
    """What transformers' own greedy `generate` answers for `prompt` (with a peft adapter when given)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.eval().generate(**ids, max_new_tokens=max_new, do_sample=False,
                                    eos_token_id=model.generation_config.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def has_openai_error_body(text: str) -> bool:
    try:
        return bool(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return False


def replica_pid(actor_name: str) -> int:
    """The process id of a Serve replica (by its actor name, namespace "serve")."""
    import ray

    return ray.get(ray.get_actor(actor_name, namespace="serve").__ray_call__.remote(lambda _: os.getpid()))


def load_with_a_replica_kill(url: str, victim: int, requests: int, concurrency: int, kill_after: int,
                             key: str | None = None) -> list[tuple[bool, int, str]]:
    """`requests` completions at `concurrency` (every tenth invalid: temperature -1), the process `victim`
    SIGKILLed once `kill_after` are answered; (valid, status, body) of each."""
    answered, killed, local = [], threading.Event(), threading.local()

    def one(i: int) -> tuple[bool, int, str]:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=120, headers={"Authorization": f"Bearer {key}"} if key else {})
        valid = i % 10 != 3
        body = {"prompt": ["发烧", "头疼怎么办", "感冒"][i % 3], "max_tokens": 12, "temperature": 0 if valid else -1}
        response = local.http.post(url + "/v1/completions", json=body)
        answered.append(i)
        if len(answered) == kill_after and not killed.is_set():
            os.kill(victim, signal.SIGKILL)
            killed.set()
        return valid, response.status_code, response.text

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    assert killed.is_set(), "the load ended before the replica was killed"
    return results


def assert_no_request_lost(results: list[tuple[bool, int, str]], label: str) -> None:
    """Every valid request answered 200, every invalid one 400, and no body that is not an OpenAI one."""
    valid = [(status, text) for ok, status, text in results if ok]
    invalid = [(status, text) for ok, status, text in results if not ok]
    failed = [(status, text) for status, text in valid if status != 200]
    plain = [text for _, text in failed + invalid if not has_openai_error_body(text)]
    print(f"{label}: {len(valid) - len(failed)}/{len(valid)} valid answered 200")
    assert not plain, f"{len(plain)} responses without an OpenAI JSON body: {[t[:200] for t in plain[:3]]}"
    assert not failed, f"{len(failed)} of {len(valid)} valid requests failed: {[f[:200] for _, f in failed[:3]]}"
    assert all(status == 400 for status, _ in invalid)


INVALID = [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "num_beams": 0}, "num_beams"),
    ({"prompt": "x", "num_beams": 9}, "num_beams"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "no_repeat_ngram_size": -2}, "no_repeat_ngram_size"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "do_sample": "yes"}, "do_sample"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "stream": True, "num_beams": 2}, "num_beams"),
    ({"prompt": "x", "temperature": 0, "do_sample": True}, "temperature"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "发烧" * 200, "max_tokens": 100}, "max_tokens"),  # longer than the model's context
]

INVALID_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"},
                   {"role": "user", "content": "hi"}]}, "messages[1].role"),
]


class OpenAIConformance:
    """The tests every engine passes; `served` comes from the subclassing module."""

    def test_routes_with_the_openai_client(self, served):
        client = openai_client(served)
        assert [m.id for m in client.models.list().data] == [served["name"], "medical-a", "medical-b"]
        assert httpx.get(served["url"] + "/health", timeout=10).json() == {"status": "ok"}

        completion = client.completions.create(model=served["name"], prompt="发烧", max_tokens=12, temperature=0)
        assert completion.object == "text_completion" and completion.usage.completion_tokens <= 12
        assert completion.usage.prompt_tokens > 0
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
        assert completion.choices[0].text == offline_greedy(served["model_dir"], "发烧", 12)

        chat = client.chat.completions.create(model=served["name"], max_tokens=12, temperature=0,
                                              messages=[{"role": "system", "content": "你是医生"},
                                                        {"role": "user", "content": "头疼怎么办？"}])
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].finish_reason in ("stop", "length")

    def test_streaming_equals_non_streaming_for_greedy(self, served):
        client, name = openai_client(served), served["name"]
        for max_tokens in (8, 24):
            full = client.completions.create(model=name, prompt="高血压患者", max_tokens=max_tokens, temperature=0)
            pieces = list(client.completions.create(model=name, prompt="高血压患者", max_tokens=max_tokens,
                                                     temperature=0, stream=True))
            assert "".join(p.choices[0].text for p in pieces) == full.choices[0].text
            assert pieces[-1].choices[0].finish_reason == full.choices[0].finish_reason
            messages = [{"role": "user", "content": "感冒了吃什么？"}]
            chat = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens,
                                                  temperature=0)
            streamed = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens,
                                                      temperature=0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
        with httpx.stream("POST", served["url"] + "/v1/completions", timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": "发烧", "max_tokens": 6, "stream": True, "temperature": 0}) as response:
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)

    def test_seeded_sampling_repeats_and_stop_strings_cut_plain_and_streamed(self, served):
        body = {"prompt": "糖尿病的饮食", "max_tokens": 20, "temperature": 0.8, "top_p": 0.9, "top_k": 20,
                "repetition_penalty": 1.3, "seed": 11, "stop": ["。"]}
        first, second = post(served, "/v1/completions", body), post(served, "/v1/completions", body)
        assert first.status_code == 200, first.text
        assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]  # same seed, same text
        assert "。" not in first.json()["choices"][0]["text"]

        greedy = post(served, "/v1/completions", {"prompt": "发烧", "max_tokens": 30, "temperature": 0}).json()
        text = greedy["choices"][0]["text"]
        stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip()), None)
        assert stop, f"greedy output too short to pick a stop string from: {text!r}"
        cut = post(served, "/v1/completions", {"prompt": "发烧", "max_tokens": 30, "temperature": 0,
                                               "stop": stop}).json()
        assert cut["choices"][0]["text"] == text[: text.find(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"
        streamed = list(openai_client(served).completions.create(model=served["name"], prompt="发烧", max_tokens=30,
                                                                 temperature=0, stop=stop, stream=True))
        assert "".join(p.choices[0].text for p in streamed) == text[: text.find(stop)]

    @pytest.mark.parametrize("body,param", INVALID)
    def test_invalid_completion_requests_are_400_with_an_openai_body(self, served, body, param):
        response = post(served, "/v1/completions", body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]

    @pytest.mark.parametrize("body,param", INVALID_CHAT)
    def test_invalid_chat_requests_are_400(self, served, body, param):
        response = post(served, "/v1/chat/completions", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text

    def test_bad_json_unknown_routes_models_and_keys(self, served):
        bad = post(served, "/v1/completions", None, raw=b"{not json")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        not_json_object = post(served, "/v1/completions", None, raw=b"[1, 2]")
        assert not_json_object.status_code == 400 and has_openai_error_body(not_json_object.text)
        missing = httpx.get(served["url"] + "/v1/nothing-here", timeout=10)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        unknown = post(served, "/v1/completions", {"prompt": "x", "model": "no-such-model"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        for key in (None, "wrong-key"):
            denied = post(served, "/v1/completions", {"prompt": "x", "max_tokens": 2}, key=key)
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(served["url"] + "/v1/models", timeout=30).status_code == 401
        assert post(served, "/v1/completions", {"prompt": "x", "max_tokens": 2}, key=OTHER_KEY).status_code == 200
