"""Ray Serve application: an OpenAI-compatible HTTP API over a merged model.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models,
GET /health. Non-streaming requests are batched dynamically (`@serve.batch`) and grouped by
sampling parameters; streaming requests run one by one, token by token. Optional: Bearer API
keys, LoRA adapters multiplexed per request from the OpenAI `model` field.

`build_app(config)` returns the bound application (for `serve.run`); `app_builder(args)` is the
import path for `serve run` / `serve deploy` YAML (`import_path: orchestrator.serve.app:app_builder`).
"""

# No `from __future__ import annotations` here: FastAPI must see real types to inject `Request`.
import asyncio
import hashlib
import hmac
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator import storage
from orchestrator.config import PipelineConfig, ServeConfig, load_config, s3_settings
from orchestrator.errors import ConfigError
from orchestrator.layout import RunLayout
from orchestrator.runtime import configure_storage
from orchestrator.serve.protocol import GenerationParams, OpenAIError, parse_chat, parse_completion

log = logging.getLogger(__name__)
api = FastAPI(title="orchestrator: OpenAI-compatible API")


@api.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return JSONResponse(OpenAIError(exc.status_code, message, code=code).body(), status_code=exc.status_code)


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error")
    error = OpenAIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
    return JSONResponse(error.body(), status_code=500)


@dataclass(frozen=True)
class ServeSettings:
    """What a replica needs, resolved on the driver (API keys only as sha256 digests)."""

    model_uri: str
    served_model_name: str
    defaults: GenerationParams
    max_tokens_limit: int
    max_batch_size: int
    batch_wait_timeout_s: float
    num_threads: int
    trust_remote_code: bool
    api_key_digests: tuple[str, ...] = field(default=(), repr=False)
    adapters: dict[str, str] = field(default_factory=dict)
    max_adapters_per_replica: int = 4
    s3: Any = None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _now() -> int:
    return int(time.time())


def _usage(out: Any) -> dict[str, int]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(api)
class OpenAIServer:
    """One replica: the model (plus any multiplexed adapters) and the HTTP routes."""

    def __init__(self, settings: ServeSettings):
        import torch

        from orchestrator.serve.engine import HFEngine

        if settings.s3 is not None:
            storage.configure(settings.s3)
        torch.set_num_threads(max(1, settings.num_threads))
        self.settings = settings
        self._cache = tempfile.mkdtemp(prefix="serve-model-")
        model_dir = storage.download_dir(settings.model_uri, os.path.join(self._cache, "model"))
        self.engine = HFEngine(model_dir, trust_remote_code=settings.trust_remote_code)
        self._model_dir = model_dir
        self._in_flight = 0  # non-streaming requests being answered by this replica
        self._generate_batch.set_max_batch_size(settings.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        async def load_adapter(model_id: str) -> Any:  # a plain function: Serve tags it with its LRU cache
            return await self._load_adapter(model_id)

        self._adapter = serve.multiplexed(max_num_models_per_replica=settings.max_adapters_per_replica)(load_adapter)

    # -- helpers
    def _authorize(self, request: Request) -> None:
        if not self.settings.api_key_digests:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token or not any(hmac.compare_digest(_digest(token), d) for d in self.settings.api_key_digests):
            raise OpenAIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                              code="invalid_api_key", type="invalid_request_error")

    async def _load_adapter(self, model_id: str) -> Any:
        from orchestrator.serve.engine import AdapterEngine

        uri = self.settings.adapters[model_id]
        local = await asyncio.to_thread(storage.download_dir, uri, os.path.join(self._cache, "adapters", model_id))
        return await asyncio.to_thread(AdapterEngine, self.engine, local)

    async def _engine_for(self, model: Optional[str]) -> Any:
        if model in (None, "", self.settings.served_model_name):
            return self.engine
        name = model.split(":", 1)[1] if model.startswith(self.settings.served_model_name + ":") else model
        if name not in self.settings.adapters:
            raise OpenAIError(404, f"model '{model}' does not exist; see GET /v1/models", param="model",
                              code="model_not_found")
        return await self._adapter(name)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _generate_batch(self, items: list[tuple[Any, list[int], GenerationParams]]) -> list[Any]:
        """Batched generation; requests that differ in engine or parameters run as separate groups."""
        results: list[Any] = [None] * len(items)
        groups: dict[tuple[int, GenerationParams], list[int]] = {}
        for i, (engine, _, params) in enumerate(items):
            groups.setdefault((id(engine), params), []).append(i)
        for (_, params), indices in groups.items():
            engine = items[indices[0]][0]
            prompts = [items[i][1] for i in indices]
            try:
                outputs = await asyncio.to_thread(engine.generate, prompts, params)
            except Exception as exc:  # fail this group only, not the whole batch
                outputs = [exc] * len(indices)
            for i, output in zip(indices, outputs):
                results[i] = output
        return results

    async def _complete(self, engine: Any, prompt_ids: list[int], params: GenerationParams) -> Any:
        self._in_flight += 1
        try:
            # Alone on the replica (nothing to batch with), or seeded (the seed must apply to this request
            # only): generate at once instead of waiting batch_wait_timeout_s for company.
            if self._in_flight == 1 or params.seed is not None or self.settings.max_batch_size == 1:
                return (await asyncio.to_thread(engine.generate, [prompt_ids], params))[0]
            result = await self._generate_batch((engine, prompt_ids, params))
        finally:
            self._in_flight -= 1
        if isinstance(result, Exception):
            raise result
        return result

    async def _body(self, request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OpenAIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    # -- routes
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        names = [self.settings.served_model_name] + sorted(self.settings.adapters)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "orchestrator"}
                                           for n in names]}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        self._authorize(request)
        req = parse_completion(await self._body(request), self.settings.defaults, self.settings.max_tokens_limit)
        engine = await self._engine_for(req.model)
        ids = engine.encode(req.prompt, req.params)
        name, rid = req.model or self.settings.served_model_name, f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            def chunk(text: str, finish: Optional[str]) -> dict:
                return {"id": rid, "object": "text_completion", "created": _now(), "model": name,
                        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
            return self._sse(engine, ids, req.params, chunk, first=None)
        out = await self._complete(engine, ids, req.params)
        return {"id": rid, "object": "text_completion", "created": _now(), "model": name,
                "choices": [{"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}],
                "usage": _usage(out)}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        self._authorize(request)
        req = parse_chat(await self._body(request), self.settings.defaults, self.settings.max_tokens_limit)
        engine = await self._engine_for(req.model)
        ids = engine.encode(engine.chat_prompt(list(req.messages)), req.params)
        name, rid = req.model or self.settings.served_model_name, f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            def chunk(text: Optional[str], finish: Optional[str], role: bool = False) -> dict:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {"id": rid, "object": "chat.completion.chunk", "created": _now(), "model": name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return self._sse(engine, ids, req.params, chunk, first=chunk(None, None, role=True))
        out = await self._complete(engine, ids, req.params)
        return {"id": rid, "object": "chat.completion", "created": _now(), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": out.finish_reason}],
                "usage": _usage(out)}

    def _sse(self, engine: Any, ids: list[int], params: GenerationParams, chunk: Any,
             first: Optional[dict]) -> StreamingResponse:
        from orchestrator.serve.engine import Completion

        async def events() -> AsyncIterator[str]:
            if first is not None:
                yield f"data: {json.dumps(first, ensure_ascii=False)}\n\n"
            pieces = engine.stream(ids, params)
            done = object()
            while True:
                piece = await asyncio.to_thread(next, pieces, done)
                if piece is done:
                    break
                if isinstance(piece, Completion):
                    yield f"data: {json.dumps(chunk('', piece.finish_reason), ensure_ascii=False)}\n\n"
                    continue
                yield f"data: {json.dumps(chunk(piece, None), ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def default_model_uri(config: PipelineConfig) -> str:
    """serve.model, else the pipeline's final model: models/preference, models/sft or models/pretrain (the last
    stage that exists)."""
    if config.serve.model:
        return config.serve.model
    layout = RunLayout.of(config)
    for stage in ("preference", "sft", "pretrain"):
        if storage.exists(storage.join(layout.model(stage), "config.json")):
            return layout.model(stage)
    raise ConfigError(f"no model to serve: set serve.model, or train first (looked in {layout.models}/preference, "
                      "/sft and /pretrain)")


def load_api_keys(cfg: ServeConfig) -> list[str]:
    """API keys from the named environment variable and/or file (never logged)."""
    keys: list[str] = []
    if cfg.api_keys_env:
        value = os.environ.get(cfg.api_keys_env)
        if not value:
            raise ConfigError(f"serve.api_keys_env names {cfg.api_keys_env}, but that variable is empty or unset")
        keys += [k.strip() for k in value.split(",") if k.strip()]
    if cfg.api_keys_file:
        try:
            with open(cfg.api_keys_file, encoding="utf-8") as handle:
                keys += [line.strip() for line in handle if line.strip() and not line.startswith("#")]
        except OSError as exc:
            raise ConfigError(f"serve.api_keys_file: cannot read {cfg.api_keys_file}: {exc.strerror}") from exc
    return keys


def serve_settings(config: PipelineConfig) -> ServeSettings:
    cfg = config.serve
    d = cfg.defaults
    defaults = GenerationParams.from_config(d)
    return ServeSettings(
        model_uri=default_model_uri(config),
        served_model_name=cfg.served_model_name or config.run_name,
        defaults=defaults,
        max_tokens_limit=cfg.max_tokens_limit,
        max_batch_size=cfg.max_batch_size,
        batch_wait_timeout_s=cfg.batch_wait_timeout_s,
        num_threads=max(1, int(cfg.num_cpus_per_replica)),
        trust_remote_code=cfg.trust_remote_code,
        api_key_digests=tuple(_digest(k) for k in load_api_keys(cfg)),
        adapters=dict(cfg.adapters),
        max_adapters_per_replica=cfg.max_adapters_per_replica,
        s3=s3_settings(config.storage),
    )


# What the vLLM engine (ray.serve.llm) cannot honour of our API, for the docs and the startup log.
VLLM_UNSUPPORTED = ("num_beams > 1", "no_repeat_ngram_size", "do_sample=false with temperature > 0 (use temperature 0)",
                    "serve.api_keys_env/api_keys_file (put an auth proxy in front)", "serve.adapters from this config")


def build_vllm_app(config: PipelineConfig) -> serve.Application:
    """serve.engine=vllm: Ray Serve LLM's OpenAI app on vLLM (GPU clusters with vLLM installed)."""
    try:
        import vllm  # noqa: F401
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError:
        raise ConfigError("serve.engine=vllm needs vLLM and a GPU (pip install vllm on the GPU image); "
                          "use serve.engine=hf on CPU") from None
    cfg = config.serve
    deployment = _replica_options(cfg)
    deployment.pop("ray_actor_options")  # ray.serve.llm places vLLM's GPUs itself
    log.warning("serve.engine=vllm does not support: %s", "; ".join(VLLM_UNSUPPORTED))
    llm = LLMConfig(model_loading_config={"model_id": cfg.served_model_name or config.run_name,
                                          "model_source": default_model_uri(config)},
                    deployment_config=deployment,
                    engine_kwargs={"trust_remote_code": cfg.trust_remote_code,
                                   "tensor_parallel_size": max(1, int(cfg.num_gpus_per_replica))})
    return build_openai_app({"llm_configs": [llm]})


def build_app(config: PipelineConfig) -> serve.Application:
    """The bound Serve application for `config.serve`."""
    cfg = config.serve
    if cfg.engine == "vllm":
        return build_vllm_app(config)
    return OpenAIServer.options(**_replica_options(cfg)).bind(serve_settings(config))


def _replica_options(cfg: ServeConfig) -> dict[str, Any]:
    """Deployment options from `serve`: replicas (fixed or autoscaled), concurrency, resources."""
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica},
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def app_builder(args: dict[str, str]) -> serve.Application:
    """For `serve run orchestrator.serve.app:app_builder config=configs/tiny.yaml [overrides=a.b=c,d.e=f]`."""
    overrides = [o for o in args.get("overrides", "").split(",") if o]
    return build_app(load_config(args["config"], overrides))


def run_server(config: PipelineConfig, blocking: bool = True) -> str:
    """Start Serve's HTTP proxy on serve.host:serve.port and deploy the app; returns the base URL."""
    configure_storage(config.storage)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    serve.run(build_app(config), name="orchestrator", route_prefix="/", blocking=blocking)
    return f"http://{config.serve.host}:{config.serve.port}"
