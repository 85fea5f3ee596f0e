"""The fal-compatible HTTP surface as a FastAPI app over any generation backend (no Ray here).

The Serve ingress builds this app over the deployment graph; tests and the in-process mode
build it over `InProcessBackend`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from contextlib import asynccontextmanager
from typing import Awaitable, Callable, Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse

from api.images import CONTENT_TYPES, ImageLoadError, data_uri, decode_image, encode_image
from api.schemas import Image, ImageToImageInput, Output, TextToImageInput, to_generation_request
from deployments.fal_proxy import FalProxyRoute
from deployments.image_fetch import fetch_image_bytes
from deployments.queue_routes import REQUEST_ID_HEADER, queue_router
from deployments.queue_worker import QueueWorker
from deployments.request_store import RequestStore, open_store
from deployments.storage import ImageStore
from models.pipeline import GenerationResult, SRPOPipeline
from models.request import GenerationRequest
from settings import Settings

logger = logging.getLogger(__name__)


LogSink = Callable[[str], None]  # receives progress messages; must be safe to call from any thread


def no_log(_: str) -> None:
    return None


class GenerationBackend(Protocol):
    async def generate(
        self, request: GenerationRequest, *, enable_safety_checker: bool, acceleration: str, log: LogSink = no_log
    ) -> GenerationResult: ...


class InProcessBackend:
    """The whole pipeline in this process, one request at a time (tests, quick local use)."""

    def __init__(self, pipeline: SRPOPipeline) -> None:
        self.pipeline = pipeline
        self._lock = asyncio.Lock()

    async def generate(
        self, request: GenerationRequest, *, enable_safety_checker: bool, acceleration: str, log: LogSink = no_log
    ) -> GenerationResult:
        def on_step(done: int, total: int) -> None:
            log(f"step {done}/{total}")

        async with self._lock:
            log("Generating in-process: prompt, denoising, decoding")
            return await asyncio.to_thread(self.pipeline.generate, request, enable_safety_checker, on_step)


def base_url(request: Request, settings: Settings) -> str:
    """The scheme and host the client used, honouring a proxy's X-Forwarded-* headers."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/")
    proto = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = request.headers.get("x-forwarded-host") or request.headers.get("host") or request.url.netloc
    return f"{proto}://{host.split(',')[0].strip()}"


class SRPOService:
    """Validated input in, fal output out: what the HTTP routes and the Python handle API both call."""

    def __init__(self, backend: GenerationBackend, settings: Settings) -> None:
        self.backend = backend
        self.settings = settings
        self.store = ImageStore(settings.storage_dir)

    async def run(self, body: TextToImageInput | ImageToImageInput, base: str, log: LogSink = no_log) -> Output:
        """Generate; `base` prefixes file URLs (unused with sync_mode, which returns data URIs)."""
        seed = body.resolved_seed()
        source = None
        if isinstance(body, ImageToImageInput):
            log("Loading the input image")
            source = await _load_source(body.image_url, self.settings)
        generation = to_generation_request(body, seed, source)
        result = await self.backend.generate(
            generation, enable_safety_checker=body.enable_safety_checker, acceleration=body.acceleration, log=log
        )
        log(f"Encoding {len(result.images)} {body.output_format} image(s)")
        encoded = await asyncio.to_thread(lambda: [encode_image(px, body.output_format) for px in result.images])
        content_type = CONTENT_TYPES[body.output_format]
        images = []
        for data in encoded:
            if body.sync_mode:
                name, url = f"{uuid.uuid4().hex}.{body.output_format}", data_uri(data, content_type)
            else:
                name = await asyncio.to_thread(self.store.save, data, body.output_format)
                url = f"{base}/files/{name}"
            images.append(Image(url=url, width=generation.width, height=generation.height,
                                content_type=content_type, file_name=name, file_size=len(data)))
        return Output(images=images, timings={"inference": round(result.inference_seconds, 4)}, seed=seed,
                      has_nsfw_concepts=result.has_nsfw_concepts, prompt=body.prompt)


def build_app(
    service: SRPOService,
    stage_health: Callable[[], Awaitable[dict[str, bool]]] | None = None,
    store: RequestStore | None = None,
) -> FastAPI:
    """The HTTP app; `store` defaults to the one the settings select (embedded or Redis)."""
    settings = service.settings
    worker = QueueWorker(store or open_store(settings), service, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker.start()
        yield
        await worker.stop()
        await worker.store.close()

    app = FastAPI(
        title="FLUX.1 SRPO [dev], fal-compatible",
        description="fal's `fal-ai/flux/srpo` endpoints, self-hosted: synchronous and queued.",
        version="0.1.0",
        lifespan=lifespan,
    )

    # Middleware added later wraps the earlier ones: proxy rewrite > CORS > request id > API key.
    @app.middleware("http")
    async def api_key(request: Request, call_next):
        if settings.api_keys and not _public(request) and not _key_accepted(request, settings.api_keys):
            return JSONResponse({"detail": "Missing or invalid API key (send 'Authorization: Key <key>')"},
                                status_code=401, headers={"WWW-Authenticate": "Key"})
        return await call_next(request)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        rid = str(uuid.uuid4())
        try:
            response = await call_next(request)
        except Exception:  # never a stack trace in a body
            logger.exception("unhandled error in request %s", rid)
            response = JSONResponse({"detail": "Internal server error"}, status_code=500)
        response.headers.setdefault(REQUEST_ID_HEADER, rid)
        return response

    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"], expose_headers=[REQUEST_ID_HEADER]
    )
    app.add_middleware(FalProxyRoute)

    in_flight = 0

    async def run(body: TextToImageInput | ImageToImageInput, request: Request) -> Output:
        nonlocal in_flight
        if in_flight >= settings.sync_max_concurrency:  # refused before any work starts
            raise HTTPException(429, "Too many requests in progress; retry later", headers={"Retry-After": "2"})
        in_flight += 1
        try:
            return await service.run(body, base_url(request, settings))
        finally:
            in_flight -= 1

    @app.post("/fal-ai/flux/srpo", response_model=Output, summary="Text to image")
    async def text_to_image(body: TextToImageInput, request: Request) -> Output:
        return await run(body, request)

    @app.post("/fal-ai/flux/srpo/image-to-image", response_model=Output, summary="Image to image")
    async def image_to_image(body: ImageToImageInput, request: Request) -> Output:
        return await run(body, request)

    app.include_router(queue_router(worker, lambda request: base_url(request, settings)))

    @app.get("/files/{name}", summary="An output image")
    async def files(name: str) -> FileResponse:
        path = service.store.path(name)
        if path is None:
            raise HTTPException(404, "No such file")
        return FileResponse(path, media_type=CONTENT_TYPES[path.suffix[1:]])

    @app.get("/health", summary="Whether every stage of the graph is ready")
    async def health() -> JSONResponse:
        stages = await stage_health() if stage_health is not None else {}
        ready = all(stages.values())
        return JSONResponse({"status": "ok" if ready else "starting", "stages": stages}, status_code=200 if ready else 503)

    return app


def _public(request: Request) -> bool:
    """Health (probes) and files (unguessable names) need no key; CORS preflights carry none."""
    path = request.url.path
    return request.method == "OPTIONS" or path == "/health" or path.startswith("/files/")


def _key_accepted(request: Request, keys: list[str]) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "key" or not given:
        return False
    return any(hmac.compare_digest(given.strip().encode(), key.encode()) for key in keys)


async def _load_source(url: str, settings: Settings):
    try:
        data = await fetch_image_bytes(
            url,
            max_bytes=settings.image_fetch_max_bytes,
            timeout_s=settings.image_fetch_timeout_s,
            allowed_networks=settings.image_url_allowed_networks,
        )
        return await asyncio.to_thread(decode_image, data, settings.image_max_source_pixels)
    except ImageLoadError as exc:
        shown = url if not url.startswith("data:") else url[:32] + "..."
        raise HTTPException(422, f"Could not load image from url: {shown} ({exc})") from exc

