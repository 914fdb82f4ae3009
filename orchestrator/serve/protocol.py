"""OpenAI-compatible request parsing and validation, and OpenAI-style error bodies (pure; no Serve).

Every value is checked here, before any work reaches the model: Hugging Face `generate` silently
accepts top_p=2 or over-long prompts and crashes on temperature<0, so nothing unchecked passes.
Unknown request fields are ignored, as OpenAI clients send fields we do not use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

from orchestrator.model.generation_params import GenerationParams  # noqa: F401 (part of this API)

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 4
MAX_BEAMS = 8


class OpenAIError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: Optional[str], message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    params: GenerationParams
    stream: bool
    model: Optional[str]


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    params: GenerationParams
    stream: bool
    model: Optional[str]


def _number(body: dict, name: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"'{name}' must be a number, got {value!r}", "invalid_type")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise invalid(name, f"'{name}' must be in {bracket}{low}, {high}], got {value}")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"'{name}' must be an integer, got {value!r}", "invalid_type")
    if not low <= value <= high:
        raise invalid(name, f"'{name}' must be between {low} and {high}, got {value}")
    return value


def _boolean(body: dict, name: str, default: Optional[bool]) -> Optional[bool]:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be true or false, got {value!r}", "invalid_type")
    return value


def parse_params(body: dict, defaults: GenerationParams, max_tokens_limit: int) -> GenerationParams:
    """Generation parameters of a request, validated, with config defaults for what it leaves out."""
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid("n", "only n=1 is supported")
    max_new = _integer(body, "max_tokens", 1, max_tokens_limit, min(defaults.max_new_tokens, max_tokens_limit))
    if body.get("max_completion_tokens") is not None:
        max_new = _integer(body, "max_completion_tokens", 1, max_tokens_limit, max_new)
    temperature = _number(body, "temperature", 0.0, 2.0, defaults.temperature)
    top_p = _number(body, "top_p", 0.0, 1.0, defaults.top_p, low_open=True)
    top_k = _integer(body, "top_k", 0, 100_000, defaults.top_k)
    num_beams = _integer(body, "num_beams", 1, MAX_BEAMS, defaults.num_beams)
    repetition_penalty = _number(body, "repetition_penalty", 0.0, 10.0, defaults.repetition_penalty, low_open=True)
    no_repeat = _integer(body, "no_repeat_ngram_size", 0, 64, defaults.no_repeat_ngram_size)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise invalid("seed", f"'seed' must be a non-negative integer, got {seed!r}", "invalid_type")
    do_sample = _boolean(body, "do_sample", None)
    if do_sample is None:
        do_sample = temperature > 0 and (defaults.do_sample or "temperature" in body)
    if do_sample and temperature == 0:
        raise invalid("temperature", "temperature 0 means greedy decoding; it cannot be combined with do_sample=true")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = defaults.stop
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= MAX_STOP_SEQUENCES:
        stops = tuple(stop)
    else:
        raise invalid("stop", f"'stop' must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} "
                              "non-empty strings", "invalid_type")
    return replace(defaults, max_new_tokens=max_new, do_sample=do_sample, temperature=temperature, top_p=top_p,
                   top_k=top_k, num_beams=num_beams, repetition_penalty=repetition_penalty,
                   no_repeat_ngram_size=no_repeat, stop=stops, seed=seed)


def _common(body: Any) -> tuple[bool, Optional[str]]:
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_json")
    stream = _boolean(body, "stream", False)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "'model' must be a string", "invalid_type")
    if stream and body.get("num_beams", 1) not in (1, None):
        raise invalid("num_beams", "beam search cannot stream; set stream=false or num_beams=1")
    return bool(stream), model


def parse_completion(body: Any, defaults: GenerationParams, max_tokens_limit: int) -> CompletionRequest:
    """POST /v1/completions body → CompletionRequest (400 OpenAIError on any bad value)."""
    stream, model = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt", "'prompt' must be a string (batches of prompts are not supported)", "invalid_type")
    if not prompt.strip():
        raise invalid("prompt", "'prompt' must not be empty")
    return CompletionRequest(prompt, parse_params(body, defaults, max_tokens_limit), stream, model)


def parse_chat(body: Any, defaults: GenerationParams, max_tokens_limit: int) -> ChatRequest:
    """POST /v1/chat/completions body → ChatRequest (400 OpenAIError on any bad value)."""
    stream, model = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list", "invalid_type")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, f"'{where}' must be an object with 'role' and 'content'", "invalid_type")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # the content-parts form: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise invalid(f"{where}.content", "only text content parts are supported", "invalid_type")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str) or (role != "system" and not content.strip()):
            raise invalid(f"{where}.content", f"'{where}.content' must be a non-empty string")
        if role == "system" and i != 0:
            raise invalid(f"{where}.role", "a system message may only come first")
        parsed.append((role, content))
    if parsed[-1][0] != "user":
        raise invalid("messages", "the last message must come from the user")
    return ChatRequest(tuple(parsed), parse_params(body, defaults, max_tokens_limit), stream, model)


def check_context(prompt_tokens: int, params: GenerationParams, context_length: int) -> None:
    """400 when the prompt plus max_tokens would not fit the model's context."""
    if prompt_tokens + params.max_new_tokens > context_length:
        raise OpenAIError(
            400,
            f"this model's context is {context_length} tokens; the prompt has {prompt_tokens} and max_tokens asks "
            f"for {params.max_new_tokens} more. Shorten the prompt or lower max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Text up to (not including) the first stop string, and whether one was found."""
    positions = [text.find(s) for s in stops if s and s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


def stop_prefix_hold(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could be the start of a stop string (held back while streaming)."""
    hold = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                hold = max(hold, length)
                break
    return hold
