"""serve.engine=vllm without vLLM running: request translation, refusals, config checks."""

from __future__ import annotations

import sys

import pytest

from orchestrator.config import config_from_dict
from orchestrator.errors import ConfigError
from orchestrator.serve.protocol import GenerationParams, OpenAIError, parse_chat, parse_completion
from orchestrator.serve.vllm_request import vllm_body

DEFAULTS = GenerationParams(max_new_tokens=16, do_sample=True, temperature=0.7, top_p=0.9)
ADAPTERS = {"medical-a": "/adapters/a"}


def test_resolved_parameters_are_sent_explicitly():
    body = {"prompt": "发烧", "temperature": 0, "stop": "。", "seed": 3, "model": "medical-a"}
    out = vllm_body(parse_completion(body, DEFAULTS, 100), body, "tiny", ADAPTERS)
    assert out == {"model": "tiny:medical-a", "stream": False, "prompt": "发烧", "max_tokens": 16,
                   "repetition_penalty": 1.0, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "stop": ["。"],
                   "seed": 3}
    sampled = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "top_k": 5,
               "stream": True, "model": "tiny"}
    chat = vllm_body(parse_chat(sampled, DEFAULTS, 100), sampled, "tiny", ADAPTERS)
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and chat["model"] == "tiny"
    assert (chat["temperature"], chat["top_p"], chat["top_k"], chat["stream"]) == (0.7, 0.9, 5, True)


@pytest.mark.parametrize("body,param", [({"prompt": "x", "num_beams": 2}, "num_beams"),
                                        ({"prompt": "x", "no_repeat_ngram_size": 3}, "no_repeat_ngram_size")])
def test_what_vllm_cannot_honour_is_a_400_naming_it(body, param):
    with pytest.raises(OpenAIError) as caught:
        vllm_body(parse_completion(body, DEFAULTS, 100), body, "tiny", ADAPTERS)
    assert caught.value.status == 400 and caught.value.param == param
    assert "serve.engine: hf" in caught.value.message


def test_unknown_model_is_404():
    body = {"prompt": "x", "model": "nope"}
    with pytest.raises(OpenAIError) as caught:
        vllm_body(parse_completion(body, DEFAULTS, 100), body, "tiny", ADAPTERS)
    assert caught.value.status == 404 and caught.value.code == "model_not_found"


def test_vllm_engine_is_refused_clearly_without_vllm(monkeypatch, tmp_path):
    from orchestrator.serve.app import build_app

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    config = config_from_dict({"run_name": "x", "model": {"base": str(tmp_path)},
                               "serve": {"engine": "vllm", "model": str(tmp_path)}})
    with pytest.raises(ConfigError, match="needs vLLM"):
        build_app(config)


def test_defaults_vllm_cannot_honour_are_a_config_error():
    from orchestrator.serve.vllm_app import refuse_defaults

    config = config_from_dict({"run_name": "x", "model": {"base": "m"},
                               "serve": {"engine": "vllm", "defaults": {"num_beams": 2}}})
    with pytest.raises(ConfigError, match="serve.defaults.num_beams"):
        refuse_defaults(config.serve)


def test_a_stream_cut_by_a_lost_replica_ends_with_an_error_event_and_done():
    import asyncio
    import json

    from ray.exceptions import ActorDiedError

    from orchestrator.serve.vllm_app import _ending_in_an_error_event

    async def events(fail: BaseException | None):
        yield 'data: {"choices": [{"text": "发"}]}\n\n'
        if fail is not None:
            raise fail
        yield "data: [DONE]\n\n"

    async def collect(fail: BaseException | None) -> list[str]:
        return [event async for event in _ending_in_an_error_event(events(fail))]

    assert asyncio.run(collect(None)) == ['data: {"choices": [{"text": "发"}]}\n\n', "data: [DONE]\n\n"]
    for fail, code in ((ActorDiedError(), "replica_unavailable"), (RuntimeError("boom"), "internal_error")):
        first, error, done = asyncio.run(collect(fail))
        assert json.loads(error.removeprefix("data: "))["error"]["code"] == code and done == "data: [DONE]\n\n"
