"""serve.engine=vllm: our validated requests as the OpenAI bodies vLLM receives (pure; no vLLM, no Serve).

The vLLM ingress parses every request with the same `protocol.parse_*` as the HF engine (same invalid
requests, same 400s), then sends vLLM the resolved parameters explicitly, config defaults included. What
vLLM cannot honour is refused with a 400 naming the parameter, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from orchestrator.serve.protocol import ChatRequest, CompletionRequest, GenerationParams, OpenAIError, invalid

UNSUPPORTED_HINT = "serve.engine: vllm cannot honour it; serve this model with serve.engine: hf"


def refuse_unsupported(params: GenerationParams, body: Optional[dict] = None) -> None:
    """400 for beam search and n-gram bans (vLLM has neither), whether from the request or serve.defaults."""
    body = body or {}
    if params.num_beams > 1:
        source = "" if "num_beams" in body else " (from serve.defaults)"
        raise invalid("num_beams", f"num_beams={params.num_beams}{source}: beam search is not supported; "
                                   f"{UNSUPPORTED_HINT}", "unsupported_parameter")
    if params.no_repeat_ngram_size > 0:
        source = "" if "no_repeat_ngram_size" in body else " (from serve.defaults)"
        raise invalid("no_repeat_ngram_size", f"no_repeat_ngram_size={params.no_repeat_ngram_size}{source} is not "
                                              f"supported; {UNSUPPORTED_HINT}", "unsupported_parameter")


def model_field(model: Optional[str], served_model_name: str, adapters: dict[str, str]) -> str:
    """The `model` vLLM must see: the base name, or `<base>:<adapter>` (ray.serve.llm's LoRA form)."""
    if model in (None, "", served_model_name):
        return served_model_name
    name = model.split(":", 1)[1] if model.startswith(served_model_name + ":") else model
    if name not in adapters:
        raise OpenAIError(404, f"model '{model}' does not exist; see GET /v1/models", param="model",
                          code="model_not_found")
    return f"{served_model_name}:{name}"


def sampling_fields(params: GenerationParams) -> dict[str, Any]:
    """HF-semantics parameters as vLLM's: greedy is temperature 0; top_k 0 means off in both."""
    fields: dict[str, Any] = {"max_tokens": params.max_new_tokens, "repetition_penalty": params.repetition_penalty}
    if params.do_sample:
        fields.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k if params.top_k else -1)
    else:
        fields.update(temperature=0.0, top_p=1.0, top_k=-1)
    if params.stop:
        fields["stop"] = list(params.stop)
    if params.seed is not None:
        fields["seed"] = params.seed
    return fields


def vllm_body(request: Union[CompletionRequest, ChatRequest], body: dict, served_model_name: str,
              adapters: dict[str, str]) -> dict[str, Any]:
    """The body sent to vLLM for a request parsed (and validated) by `protocol.parse_completion/parse_chat`."""
    refuse_unsupported(request.params, body)
    out: dict[str, Any] = {"model": model_field(request.model, served_model_name, adapters), "stream": request.stream,
                           **sampling_fields(request.params)}
    if isinstance(request, CompletionRequest):
        out["prompt"] = request.prompt
    else:
        out["messages"] = [{"role": role, "content": content} for role, content in request.messages]
    if request.stream:
        out["stream_options"] = {"include_usage": False}
    return out
