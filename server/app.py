"""The fal-compatible HTTP surface: a FastAPI app over an `SRPOService` (no Ray here).

The Serve ingress builds this app over the deployment graph; tests and the in-process mode build
it over `InProcessBackend`.
"""

from __future__ import annotations

import asyncio
import math
import logging
from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response

from api.schemas import (ERROR_TYPE_HEADER, REQUEST_ID_HEADER, ImageToImageInput, Output, TextToImageInput,
                         readable_errors)
from server.errors import ServiceError
from server.body_limit import BodyLimit
from server.envelope import ApiKeys, RequestIds, is_openai
from server.fal_proxy import FalProxyRoute
from server.headers import FalHeaders
from server.images import CONTENT_TYPES
from server.logging_context import install as tag_logs_with_request_ids
from server.openai_api import OpenAIError, from_validation_error, openai_router
from server.periodic import every
from server.playground import mount_pages
from server.queue.routes import queue_router
from server.queue.store import RequestStore, open_store
from server.queue.worker import QueueWorker
from server.service import FalInput, SRPOService
from server.telemetry import HttpTelemetry
from settings import Settings

logger = logging.getLogger(__name__)


def base_url(request: Request, settings: Settings) -> str:
    """The scheme and host the client used, honouring a proxy's X-Forwarded-* headers."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/")
    # The scheme from the scope: `request.url` parses the whole URL (a tenth of a status read's cost).
    proto = (request.headers.get("x-forwarded-proto") or request.scope["scheme"]).split(",")[0].strip()
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
        if is_openai(request.url.path):  # OpenAI's clients expect 400 and their error shape
            return from_validation_error(exc).response()
        # FastAPI's own body, but an input of NaN or Infinity is echoed as text (JSON has no such number)
        # and a long one is cut, so a 20 MB prompt is not sent back.
        return JSONResponse({"detail": _json_safe(jsonable_encoder(readable_errors(exc.errors())))}, status_code=422)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "error_type": exc.error_type}, status_code=exc.status_code)

    async def store_unreachable(_: Request, exc: Exception) -> JSONResponse:
        logger.warning("The request store cannot be reached: %s", exc)
        return JSONResponse({"detail": "The request queue's store cannot be reached; retry later",
                             "error_type": "store_unavailable"}, status_code=503, headers={"Retry-After": "5"})

    for unreachable in worker.store.unreachable:
        app.add_exception_handler(unreachable, store_unreachable)

    # Middleware added later wraps the earlier ones: proxy rewrite > CORS > request id > API key > body cap.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    app.add_middleware(ApiKeys, keys=settings.api_keys)
    app.add_middleware(RequestIds)
    app.add_middleware(HttpTelemetry, telemetry=service.telemetry)  # outside RequestIds: sees the error types

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


