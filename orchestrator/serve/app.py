"""Ray Serve application (serve.engine=hf): an OpenAI-compatible HTTP API over a merged model.

Two deployments. `OpenAIIngress` (FastAPI, light) owns HTTP: API keys, JSON parsing and validation,
the OpenAI response shapes, and replica failures — a non-streaming request whose model replica dies is
sent again to another replica, and only when every attempt fails does it answer a 503 with an OpenAI
body (never Serve's plain-text 500); a stream that loses its replica ends with an error event. `ModelServer`
(the replicas that hold the model) runs continuous batching (orchestrator/serve/continuous.py): requests
join the running batch between decode steps and leave it when done, streaming ones included. LoRA adapters
are multiplexed per request from the OpenAI `model` field (Serve routes a request to a replica that has its
adapter loaded).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models, GET /health.

`build_app(config)` returns the bound application (for `serve.run`); `app_builder(args)` is the import path
for `serve run` / `serve deploy` YAML (`import_path: orchestrator.serve.app:app_builder`).
"""

# No `from __future__ import annotations` here: FastAPI must see real types to inject `Request`.
import asyncio
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from orchestrator import storage
from orchestrator.config import PipelineConfig, load_config
from orchestrator.runtime import configure_storage
from orchestrator.serve.http import authorize, install_error_handlers, on_a_live_replica, parse_json, stream_failure
from orchestrator.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    GenerationParams,
    OpenAIError,
    parse_chat,
    parse_completion,
)
from orchestrator.serve.settings import ServeSettings, replica_options, serve_settings

log = logging.getLogger(__name__)
api = FastAPI(title="orchestrator: OpenAI-compatible API")
install_error_handlers(api)
LLMRequest = Union[CompletionRequest, ChatRequest]


@dataclass(frozen=True)
class Failure:
    """An OpenAI error returned (not raised) by a model replica, so it crosses the handle intact."""

    status: int
    body: dict

    def error(self) -> OpenAIError:
        e = self.body["error"]
        return OpenAIError(self.status, e["message"], param=e["param"], code=e["code"], type=e["type"])


def _now() -> int:
    return int(time.time())


def _usage(out: Any) -> dict[str, int]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


@serve.deployment(max_ongoing_requests=32)
class ModelServer:
    """One model replica: the engine, its multiplexed adapters, one continuous-batching loop per engine."""

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

        async def load_adapter(model_id: str) -> Any:  # a plain function: Serve tags it with its LRU cache
            return await self._load_adapter(model_id)

        self._adapter = serve.multiplexed(max_num_models_per_replica=settings.max_adapters_per_replica)(load_adapter)

    async def _load_adapter(self, name: str) -> Any:
        from orchestrator.serve.engine import AdapterEngine

        uri = self.settings.adapters[name]
        local = await asyncio.to_thread(storage.download_dir, uri, os.path.join(self._cache, "adapters", name))
        return await asyncio.to_thread(AdapterEngine, self.engine, local)

    async def _engine(self) -> Any:
        name = serve.get_multiplexed_model_id()
        return await self._adapter(name) if name else self.engine

    def _prompt_ids(self, engine: Any, request: LLMRequest) -> list[int]:
        if isinstance(request, CompletionRequest):
            return engine.encode(request.prompt, request.params)
        return engine.encode_chat(list(request.messages), request.params)

    async def _events(self, engine: Any, ids: list[int], params: GenerationParams) -> AsyncIterator[Any]:
        """Token ids from the engine's decode loop, then its Completion (an exception is raised)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        batcher = engine.continuous(self.settings.max_batch_size)
        sequence = batcher.submit(ids, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                finished = not isinstance(event, int)
                yield event
                if finished:
                    return
        finally:
            if not finished:  # the caller went away: free the batch slot
                batcher.cancel(sequence)

    async def complete(self, request: LLMRequest) -> Any:
        """The Completion of a non-streaming request, or a Failure (e.g. 400 prompt too long)."""
        try:
            engine = await self._engine()
            ids = self._prompt_ids(engine, request)
        except OpenAIError as exc:
            return Failure(exc.status, exc.body())
        async for event in self._events(engine, ids, request.params):
            if not isinstance(event, int):
                return event

    async def stream(self, request: LLMRequest) -> AsyncIterator[Any]:
        """Text deltas (str) as tokens are decoded, then the Completion; or one Failure."""
        from orchestrator.serve.engine import TextDeltas

        try:
            engine = await self._engine()
            ids = self._prompt_ids(engine, request)
        except OpenAIError as exc:
            yield Failure(exc.status, exc.body())
            return
        deltas = TextDeltas(engine, request.params)
        async for event in self._events(engine, ids, request.params):
            if isinstance(event, int):
                piece = deltas.push(event)
                if piece:
                    yield piece
            else:
                rest = deltas.last(event)
                if rest:
                    yield rest
                yield event


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class OpenAIIngress:
    """The HTTP routes; every generation goes to a `ModelServer` replica through a handle."""

    def __init__(self, settings: ServeSettings, model_server: Any):
        self.settings = settings
        self._model = model_server
        self._handles: dict[tuple[str, bool], Any] = {}

    def _authorize(self, request: Request) -> None:
        authorize(request.headers, self.settings.api_key_digests)

    def _adapter_name(self, model: Optional[str]) -> str:
        """'' for the base model, else the adapter's name; 404 for a model this app does not serve."""
        served = self.settings.served_model_name
        if model in (None, "", served):
            return ""
        name = model.split(":", 1)[1] if model.startswith(served + ":") else model
        if name not in self.settings.adapters:
            raise OpenAIError(404, f"model '{model}' does not exist; see GET /v1/models", param="model",
                              code="model_not_found")
        return name

    def _handle(self, adapter: str, stream: bool) -> Any:
        key = (adapter, stream)
        if key not in self._handles:
            options: dict[str, Any] = {"stream": stream}
            if adapter:
                options["multiplexed_model_id"] = adapter
            self._handles[key] = self._model.options(**options)
        return self._handles[key]

    async def _complete(self, request: LLMRequest) -> Any:
        """A non-streaming request; sent again to another replica when its replica dies."""
        handle = self._handle(self._adapter_name(request.model), stream=False)
        result = await on_a_live_replica(lambda: handle.complete.remote(request))
        if isinstance(result, Failure):
            raise result.error()
        return result

    async def _stream(self, request: LLMRequest, chunk: Any, first: Optional[dict]) -> StreamingResponse:
        """SSE events. The first event is awaited before answering, so a 400 stays a 400; a replica lost before
        anything was sent is retried, one lost later ends the stream with an error event."""
        handle = self._handle(self._adapter_name(request.model), stream=True)

        async def first_event() -> tuple[Any, Any]:
            events = handle.stream.remote(request)
            return events, await events.__anext__()

        events, head = await on_a_live_replica(first_event)
        if isinstance(head, Failure):
            raise head.error()

        def sse(data: Any) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def body() -> AsyncIterator[str]:
            if first is not None:
                yield sse(first)
            event = head
            while True:
                yield sse(chunk(event, None) if isinstance(event, str) else chunk("", event.finish_reason))
                if not isinstance(event, str):
                    break
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    yield sse(stream_failure(exc).body())
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

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
        req = parse_completion(parse_json(await request.body()), self.settings.defaults,
                               self.settings.max_tokens_limit)
        name, rid = req.model or self.settings.served_model_name, f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            def chunk(text: str, finish: Optional[str]) -> dict:
                return {"id": rid, "object": "text_completion", "created": _now(), "model": name,
                        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
            return await self._stream(req, chunk, first=None)
        out = await self._complete(req)
        return {"id": rid, "object": "text_completion", "created": _now(), "model": name,
                "choices": [{"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}],
                "usage": _usage(out)}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        self._authorize(request)
        req = parse_chat(parse_json(await request.body()), self.settings.defaults, self.settings.max_tokens_limit)
        name, rid = req.model or self.settings.served_model_name, f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            def chunk(text: Optional[str], finish: Optional[str], role: bool = False) -> dict:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {"id": rid, "object": "chat.completion.chunk", "created": _now(), "model": name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return await self._stream(req, chunk, first=chunk(None, None, role=True))
        out = await self._complete(req)
        return {"id": rid, "object": "chat.completion", "created": _now(), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": out.finish_reason}],
                "usage": _usage(out)}


def build_app(config: PipelineConfig) -> serve.Application:
    """The bound Serve application for `config.serve` (either engine)."""
    if config.serve.engine == "vllm":
        from orchestrator.serve.vllm_app import build_vllm_app

        return build_vllm_app(config)
    settings = serve_settings(config)
    return OpenAIIngress.bind(settings, ModelServer.options(**replica_options(config.serve)).bind(settings))


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
