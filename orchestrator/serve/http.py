"""The HTTP edge both engines share: Bearer API keys, JSON bodies, OpenAI-style error bodies for every
failure (including unknown routes and crashes), and what counts as a lost replica."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from typing import Any, Awaitable, Callable, TypeVar

from orchestrator.config import ServeConfig
from orchestrator.errors import ConfigError
from orchestrator.serve.protocol import OpenAIError

log = logging.getLogger(__name__)
REPLICA_ATTEMPTS = 4  # tries of a request across replicas before answering 503
RETRY_PAUSE_S = 0.25  # between tries: time for Serve to see the dead replica and route elsewhere
T = TypeVar("T")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


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


def authorize(headers: Any, key_digests: tuple[str, ...]) -> None:
    """401 unless the request carries one of the keys (compared as sha256 digests, in constant time)."""
    if not key_digests:
        return
    header = headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not token or not any(hmac.compare_digest(digest(token), d) for d in key_digests):
        raise OpenAIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                          code="invalid_api_key", type="invalid_request_error")


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def install_error_handlers(api: Any) -> None:
    """OpenAIError -> its body and status; unknown routes -> 404/405 bodies; anything else -> a 500 body."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def openai_error(_: Any, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Any, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        routed = exc.status_code in (404, 405)
        message = f"no route {request.method} {request.url.path}" if routed else str(exc.detail)
        return JSONResponse(OpenAIError(exc.status_code, message, code=code).body(), status_code=exc.status_code)

    async def internal_error(_: Any, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        error = OpenAIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    api.add_exception_handler(OpenAIError, openai_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(Exception, internal_error)


def replica_lost(exc: BaseException) -> bool:
    """The replica answering a request died or became unreachable (so the request never finished there)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


async def on_a_live_replica(send: Callable[[], Awaitable[T]]) -> T:
    """`await send()`, sent again (after a pause) while the replica answering it is lost: a generation has no side
    effects, so a retry is safe. A 503 (OpenAI body) after REPLICA_ATTEMPTS lost replicas."""
    for attempt in range(1, REPLICA_ATTEMPTS + 1):
        try:
            return await send()
        except Exception as exc:
            if not replica_lost(exc):
                raise
            log.warning("replica lost during a request (attempt %d of %d): %s", attempt, REPLICA_ATTEMPTS,
                        type(exc).__name__)
            if attempt == REPLICA_ATTEMPTS:
                raise unavailable(attempt) from None
            await asyncio.sleep(RETRY_PAUSE_S * attempt)
    raise AssertionError("REPLICA_ATTEMPTS must be at least 1")


def stream_failure(exc: BaseException) -> OpenAIError:
    """The error event that ends a stream whose generation failed after its first event."""
    log.warning("stream ended early: %s", type(exc).__name__)
    if replica_lost(exc):
        return unavailable(1)
    return OpenAIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


def unavailable(attempts: int) -> OpenAIError:
    return OpenAIError(503, f"the model replica serving this request stopped ({attempts} attempts); retry shortly",
                       code="replica_unavailable", type="server_error")
