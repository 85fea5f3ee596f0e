"""The fal-compatible HTTP surface: a FastAPI app over an `SRPOService` (no Ray here).

The Serve ingress builds this app over the deployment graph; tests and the in-process mode build
it over `InProcessBackend`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import logging
import uuid
from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response

from api.schemas import (ERROR_TYPE_HEADER, REQUEST_ID_HEADER, ImageToImageInput, Output, TextToImageInput,
                         readable_errors)
from server.errors import ServiceError, default_error_type
from server.body_limit import BodyLimit
from server.fal_proxy import FalProxyRoute
from server.headers import FalHeaders
from server.images import CONTENT_TYPES
from server.logging_context import install as tag_logs_with_request_ids, request_context
from server.openai_api import OpenAIError, from_validation_error, openai_router
from server.periodic import every
from server.playground import is_public_page, mount_pages
from server.queue.routes import queue_router
from server.queue.store import RequestStore, open_store
from server.queue.worker import QueueWorker
from server.service import FalInput, SRPOService
from server.telemetry import http_telemetry
from settings import Settings

logger = logging.getLogger(__name__)


def base_url(request: Request, settings: Settings) -> str:
    """The scheme and host the client used, honouring a proxy's X-Forwarded-* headers."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/")
    proto = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = request.headers.get("x-forwarded-host") or request.headers.get("host") or request.url.netloc
    return f"{proto}://{host.split(',')[0].strip()}"


def build_app(
    service: SRPOService,
    stage_health: Callable[[], Awaitable[dict[str, bool]]] | None = None,
    store: RequestStore | None = None,
) -> FastAPI:
    """The HTTP app; `store` defaults to the one the settings select (embedded or Redis)."""
    settings = service.settings
    tag_logs_with_request_ids()
    worker = QueueWorker(store or open_store(settings), service, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker.start()
        sweeper = asyncio.get_running_loop().create_task(
            every(settings.storage_sweep_interval_s, lambda: asyncio.to_thread(service.storage.sweep_outputs),
                  "output sweep"))
        yield
        sweeper.cancel()
        await worker.stop()
        await worker.store.close()

    app = FastAPI(
        title="FLUX.1 SRPO [dev], fal-compatible",
        description="fal's `fal-ai/flux/srpo` endpoints, self-hosted: synchronous and queued.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served offline by server/playground.py
        redoc_url=None,
    )

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if _is_openai(request):  # OpenAI's clients expect 400 and their error shape
            return from_validation_error(exc).response()
        # FastAPI's own body, but an input of NaN or Infinity is echoed as text (JSON has no such number)
        # and a long one is cut, so a 20 MB prompt is not sent back.
        return JSONResponse({"detail": _json_safe(jsonable_encoder(readable_errors(exc.errors())))}, status_code=422)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "error_type": exc.error_type}, status_code=exc.status_code)

    # Middleware added later wraps the earlier ones: proxy rewrite > CORS > request id > API key > body cap.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def api_key(request: Request, call_next):
        if settings.api_keys and not _public(request) and not _key_accepted(request, settings.api_keys):
            if _is_openai(request):
                return OpenAIError(401, "Missing or invalid API key (send 'Authorization: Bearer <key>')",
                                   code="invalid_api_key").response()
            return JSONResponse({"detail": "Missing or invalid API key (send 'Authorization: Key <key>')"},
                                status_code=401, headers={"WWW-Authenticate": "Key"})
        return await call_next(request)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        rid = str(uuid.uuid4())
        with request_context(rid):  # every log line of the request carries its id
            try:
                response = await call_next(request)
            except Exception:  # never a stack trace in a body
                logger.exception("unhandled error in request")
                response = JSONResponse({"detail": "Internal server error"}, status_code=500)
        if response.status_code >= 400 and request.url.path != "/health":
            response = await _with_error_type(response)
        response.headers.setdefault(REQUEST_ID_HEADER, rid)
        return response

    app.middleware("http")(http_telemetry(service.telemetry))  # outside request_id: sees the error types

    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"],
        expose_headers=[REQUEST_ID_HEADER, ERROR_TYPE_HEADER],
    )
    app.add_middleware(FalProxyRoute)

    in_flight = 0

    async def run(body: FalInput, request: Request, headers: FalHeaders | None = None) -> Output:
        """A synchronous request starts at once (or gets 429): its start timeout is always met."""
        nonlocal in_flight
        headers = headers or FalHeaders.absent()
        if in_flight >= settings.sync_max_concurrency:  # refused before any work starts
            raise HTTPException(429, "Too many requests in progress (SRPO_SYNC_MAX_CONCURRENCY); retry later",
                                headers={"Retry-After": "2"})
        in_flight += 1
        try:
            return await service.run(body, base_url(request, settings), output_ttl_s=headers.output_ttl_s,
                                     retry=headers.retry)
        finally:
            in_flight -= 1

    @app.post("/fal-ai/flux/srpo", response_model=Output, summary="Text to image")
    async def text_to_image(body: TextToImageInput, request: Request, headers: FalHeaders = Depends()) -> Output:
        return await run(body, request, headers)

    @app.post("/fal-ai/flux/srpo/image-to-image", response_model=Output, summary="Image to image")
    async def image_to_image(body: ImageToImageInput, request: Request, headers: FalHeaders = Depends()) -> Output:
        return await run(body, request, headers)

    app.include_router(queue_router(worker, lambda request: base_url(request, settings)))
    app.include_router(openai_router(run))
    mount_pages(app, settings)

    @app.get("/files/{name}", summary="An output image (until it expires)")
    async def files(name: str) -> Response:
        media_type = CONTENT_TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream")
        if service.storage.is_local:
            if (path := service.storage.local_path(name)) is not None:
                return FileResponse(path, media_type=media_type)
        elif (data := await asyncio.to_thread(service.storage.read_output, name)) is not None:
            return Response(data, media_type=media_type)
        raise HTTPException(404, "No such file")

    @app.get("/health", summary="Readiness: every stage of the graph has replicas serving")
    async def health() -> JSONResponse:
        if stage_health is None:  # no graph: the in-process backend answers when the app does
            stages, ready = {}, True
        else:  # no stage listed (Serve's status lacks the application) is not ready either
            stages = await stage_health()
            ready = bool(stages) and all(stages.values())
        return JSONResponse({"status": "ok" if ready else "starting", "stages": stages}, status_code=200 if ready else 503)

    @app.get("/livez", summary="Liveness: this process answers (for a probe that restarts it)")
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    return app


ECHO_MAX_CHARS = 200


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str) and len(value) > ECHO_MAX_CHARS:
        return value[:ECHO_MAX_CHARS] + "..."
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


async def _with_error_type(response: Response) -> Response:
    """fal's contract: every failure names its error_type in the body and in X-Fal-Error-Type."""
    if hasattr(response, "body_iterator"):  # error bodies are small: read them whole
        body = b"".join([chunk async for chunk in response.body_iterator])
    else:
        body = response.body
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and "error" not in data:  # "error": OpenAI's shape, which has its own type
        error_type = data.setdefault("error_type", headers.get(ERROR_TYPE_HEADER) or default_error_type(
            response.status_code))
        headers[ERROR_TYPE_HEADER] = error_type
        return JSONResponse(data, status_code=response.status_code, headers=headers)
    return Response(body, status_code=response.status_code, headers=headers)


def _public(request: Request) -> bool:
    """Health (probes), files (unguessable names) and the pages need no key; CORS preflights carry none."""
    path = request.url.path
    return (request.method == "OPTIONS" or path in ("/health", "/livez") or path.startswith("/files/")
            or is_public_page(path))


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _key_accepted(request: Request, keys: list[str]) -> bool:
    """fal's `Authorization: Key <key>`; on the OpenAI routes also OpenAI's `Bearer <key>`."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    schemes = ("key", "bearer") if _is_openai(request) else ("key",)
    if scheme.lower() not in schemes or not given:
        return False
    return any(hmac.compare_digest(given.strip().encode(), key.encode()) for key in keys)
