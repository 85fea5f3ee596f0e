"""Validated fal input in, fal output out, over any generation backend.

The HTTP routes, the queue worker and the Ray handle API all call `SRPOService.run`. A backend
runs the model: the Serve graph (deployments/ingress.py) or the whole pipeline in this process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Callable, Protocol

from PIL.Image import Image as PILImage

from api.schemas import (
    DEFAULT_MAX_PIXELS,
    Image,
    ImageToImageInput,
    Output,
    TextToImageInput,
    round_side,
)
from models.pipeline import SRPOPipeline
from models.lora_files import LoraFormatError
from models.request import GenerationRequest, GenerationResult, LoraRef
from server.errors import InputError, ServiceError, field_error
from server.image_fetch import fetch_image_bytes
from server.images import CONTENT_TYPES, ImageLoadError, data_uri, decode_image, encode_image
from server.lora_sources import LoraSources
from server.retry import RetryPolicy, describe
from server.storage import StorageError, open_object_store
from server.telemetry import Telemetry
from settings import Settings

LogSink = Callable[[str], None]  # receives progress messages; must be safe to call from any thread
FalInput = TextToImageInput | ImageToImageInput
logger = logging.getLogger(__name__)


def no_log(_: str) -> None:
    return None


class GenerationBackend(Protocol):
    async def generate(
        self, request: GenerationRequest, *, enable_safety_checker: bool, acceleration: str, log: LogSink = no_log
    ) -> GenerationResult: ...

    def is_transient(self, exc: BaseException) -> bool:
        """Whether `exc` is a failure of the infrastructure (worth running the request again)."""
        ...

    def has_room(self) -> bool:
        """Whether a request handed over now would start soon (the queue claims from its store only then)."""
        ...


class InProcessBackend:
    """The whole pipeline in this process, one request at a time (tests, quick local use)."""

    def __init__(self, pipeline: SRPOPipeline) -> None:
        self.pipeline = pipeline
        self._lock = asyncio.Lock()
        self._calls = 0

    async def generate(
        self, request: GenerationRequest, *, enable_safety_checker: bool, acceleration: str, log: LogSink = no_log
    ) -> GenerationResult:
        def on_step(done: int, total: int) -> None:
            log(f"step {done}/{total}")

        self._calls += 1
        try:
            async with self._lock:
                log("Generating in-process: prompt, denoising, decoding")
                return await asyncio.to_thread(self.pipeline.generate, request, enable_safety_checker, on_step)
        finally:
            self._calls -= 1

    def is_transient(self, exc: BaseException) -> bool:
        return False  # one process: nothing to fail over to

    def has_room(self) -> bool:
        return self._calls == 0


def fit_to_pixel_cap(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Scale (width, height) down to at most max_pixels keeping the aspect ratio, then round to 16."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    return round_side(int(width * scale)), round_side(int(height * scale))


def to_generation_request(
    body: FalInput, seed: int, image: PILImage | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    loras: tuple[LoraRef, ...] = (),
) -> GenerationRequest:
    """The model-level request for a validated body (image-to-image needs its decoded source)."""
    if isinstance(body, ImageToImageInput):
        if image is None:
            raise ValueError("image-to-image needs its source image")
        width, height = fit_to_pixel_cap(image.width, image.height, max_pixels)
        strength = body.strength
    else:
        width, height = body.output_size()
        image, strength = None, 1.0
    return GenerationRequest(
        prompt=body.prompt,
        width=width,
        height=height,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        seed=seed,
        num_images=body.num_images,
        image=image,
        strength=strength,
        loras=loras,
    )


def lora_failure(exc: BaseException) -> LoraFormatError | None:
    """The LoraFormatError behind a stage's failure (Ray wraps a replica's exception), if that was it."""
    while exc is not None:
        if isinstance(exc, LoraFormatError) and type(exc).__name__ == "LoraFormatError":
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


class SRPOService:
    """What the HTTP routes, the queue worker and the Python handle API call."""

    def __init__(self, backend: GenerationBackend, settings: Settings, telemetry: Telemetry | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.telemetry = telemetry or Telemetry()
        self.storage = open_object_store(settings)
        self.retry_policy = RetryPolicy(settings.retry_max_attempts)
        self.loras = LoraSources(settings)

    def check(self, body: FalInput) -> None:
        """This deployment's limits beyond the schema's; raises InputError (422) before any work."""
        if isinstance(body, TextToImageInput):
            width, height = body.output_size()
            cap = self.settings.max_pixels
            if width * height > cap:
                message = f"{width}x{height} is {width * height} pixels; this deployment allows at most {cap} per image"
                raise field_error("image_size", f"{message} (SRPO_MAX_PIXELS)", body.model_dump(mode="json")["image_size"])
        settings = self.settings
        if len(body.loras) > settings.lora_max_per_request:
            raise field_error("loras", f"{len(body.loras)} LoRAs; this deployment applies at most "
                              f"{settings.lora_max_per_request} per request (SRPO_LORA_MAX_PER_REQUEST)", len(body.loras))
        for lora in body.loras:
            if abs(lora.scale) > settings.lora_max_abs_scale:
                raise field_error("loras", f"scale {lora.scale:g} of {lora.path} is outside "
                                  f"[-{settings.lora_max_abs_scale:g}, {settings.lora_max_abs_scale:g}] "
                                  f"(SRPO_LORA_MAX_ABS_SCALE)", lora.scale)

    async def run(
        self, body: FalInput, base: str, log: LogSink = no_log, output_ttl_s: float | None = None, retry: bool = True
    ) -> Output:
        """Generate; `base` prefixes /files URLs (unused with sync_mode, which returns data URIs).

        Output files are kept `output_ttl_s` (default: the `output_ttl_s` setting). A model replica
        that dies mid-request makes the request run again (same seed, same pixels) unless `retry`
        is False; the whole run is bounded by the `request_timeout_s` setting.
        """
        timeout_s = self.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await self._run(body, base, log, output_ttl_s, retry, time.monotonic() + timeout_s)
        except TimeoutError as exc:
            raise ServiceError(f"Request did not finish within {timeout_s:g} s (SRPO_REQUEST_TIMEOUT_S)", 504,
                               "request_timeout") from exc

    async def _run(
        self, body: FalInput, base: str, log: LogSink, output_ttl_s: float | None, retry: bool, deadline: float
    ) -> Output:
        self.check(body)
        seed = body.resolved_seed()
        source = None
        if isinstance(body, ImageToImageInput):
            log("Loading the input image")
            source = await self._load_source(body.image_url)
        loras = ()
        if body.loras:
            log(f"Loading {len(body.loras)} LoRA(s)")
            loras = await self.loras.resolve_all(body.loras)
        generation = to_generation_request(body, seed, source, self.settings.max_pixels, loras)
        policy = self.retry_policy if retry else RetryPolicy(max_attempts=1)
        attempts = 0

        async def attempt() -> GenerationResult:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                self.telemetry.retried("replica_failure")
            return await self.backend.generate(generation, enable_safety_checker=body.enable_safety_checker,
                                               acceleration=body.acceleration, log=log)

        try:
            result = await policy.run(attempt, self.backend.is_transient, log, deadline)
        except Exception as exc:
            if (bad_lora := lora_failure(exc)) is not None:
                raise InputError(str(bad_lora.args[0]) if bad_lora.args else "unusable LoRA") from exc
            if not self.backend.is_transient(exc):
                raise
            tries = "" if policy.max_attempts == 1 else f" after {policy.max_attempts} attempts"
            raise ServiceError(f"Request failed{tries}: {describe(exc)}", 503, "runner_disconnected") from exc
        log(f"Encoding {len(result.images)} {body.output_format} image(s)")
        encoded = await asyncio.to_thread(lambda: [encode_image(px, body.output_format) for px in result.images])
        content_type = CONTENT_TYPES[body.output_format]
        images = []
        for data in encoded:
            if body.sync_mode:
                name, url = f"{uuid.uuid4().hex}.{body.output_format}", data_uri(data, content_type)
            else:
                name, url = await self._store_output(data, body.output_format, base, output_ttl_s)
            images.append(Image(url=url, width=generation.width, height=generation.height,
                                content_type=content_type, file_name=name, file_size=len(data)))
        self.telemetry.images_generated(len(images))
        logger.info("generated %d image(s) at %dx%d (seed %d) in %.2f s", len(images), generation.width,
                    generation.height, seed, result.inference_seconds)
        return Output(images=images, timings={"inference": round(result.inference_seconds, 4)}, seed=seed,
                      has_nsfw_concepts=result.has_nsfw_concepts, prompt=body.prompt)

    async def _store_output(self, data: bytes, extension: str, base: str, ttl_s: float | None) -> tuple[str, str]:
        """(name, URL) of a stored output; a storage failure fails the request rather than return a dead URL."""
        try:
            name = await asyncio.to_thread(self.storage.save_output, data, extension, ttl_s)
            return name, await asyncio.to_thread(self.storage.output_url, name, base)
        except StorageError as exc:
            raise ServiceError(f"Could not store the output image: {exc}", 503, "storage_error") from exc

    async def _load_source(self, url: str) -> PILImage:
        settings = self.settings
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
            raise InputError(f"Could not load image from url: {shown} ({exc})") from exc
