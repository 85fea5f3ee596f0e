"""Ingress stage: the fal HTTP API (FastAPI) and the Python handle API over the stage graph."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from ray import serve
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    NodeDiedError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from api.schemas import Output
from deployments.metrics import ServeTelemetry
from deployments.logs import configure_ingress_logs
from models.request import GenerationRequest, GenerationResult
from server.app import build_app
from server.service import FalInput, LogSink, SRPOService, no_log
from settings import get_settings

# A replica process or its node went away, or Serve had no replica to take the call: the request can
# run again elsewhere. RayTaskError wraps them when a stage received an upstream stage's result.
REPLICA_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError, NodeDiedError,
                    DeploymentUnavailableError, ReplicaUnavailableError)
STATUS_CACHE_S = 1.0
READY = {"HEALTHY", "UPSCALING", "DOWNSCALING"}  # deployment statuses that serve traffic


class GraphBackend:
    """Runs one generation across the stages. Prompt embeddings and image-to-image start latents go
    straight from stage to stage through the object store; the final latents come back with the
    Denoiser's progress stream (small: ~0.8 MB for 1024x768) and are passed on to the Decoder."""

    def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle, decoder: DeploymentHandle) -> None:
        self.stages = {"text_encoder": text_encoder, "denoiser": denoiser, "decoder": decoder}

    async def generate(
        self, request: GenerationRequest, *, enable_safety_checker: bool, acceleration: str, log: LogSink = no_log
    ) -> GenerationResult:
        began = time.perf_counter()
        text, denoiser, decoder = self.stages.values()
        log("Encoding the prompt")
        embedding = text.encode.remote(request.prompt)
        image_start = None
        if request.image is not None:
            log("Encoding the input image")
            image_start = decoder.encode_image.remote(
                request.image, request.height, request.width, request.seed, request.num_images
            )
        # Cancelling this coroutine cancels the stream, which takes the request out of the engine.
        stream = denoiser.options(stream=True).denoise.remote(
            dataclasses.replace(request, image=None), embedding, image_start, acceleration
        )
        latents, logged = None, 0
        try:
            async for update in stream:
                if update.note:
                    log(update.note)
                if update.step == 0:
                    log(f"Denoising {request.num_images} image(s) at {request.width}x{request.height}")
                for step in range(logged + 1, update.step + 1):  # updates are coalesced
                    log(f"step {step}/{update.total}")
                logged = max(logged, update.step)
                latents = update.latents
        except asyncio.CancelledError:
            stream.cancel()  # leaving the iteration alone does not stop the replica's generator
            raise
        log("Decoding" + (" and checking safety" if enable_safety_checker else ""))
        decoded = await decoder.decode.remote(latents, request.height, request.width, enable_safety_checker)
        return GenerationResult(decoded.images, decoded.has_nsfw_concepts, request.seed, time.perf_counter() - began)

    def is_transient(self, exc: BaseException | None) -> bool:
        # Ray raises e.g. `RayTaskError(ActorDiedError)` (an instance of both), and Serve's router a
        # RayServeException caused by it when the dead replica was an upstream stage's.
        while exc is not None:
            if isinstance(exc, REPLICA_FAILURES):
                return True
            exc = exc.cause if isinstance(exc, RayTaskError) else exc.__cause__
        return False


class GraphHealth:
    """Readiness from Serve's own view of the application (the controller's deployment statuses),
    never from calls that would queue behind requests; cached briefly so probes cost nothing."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self._checked, self._stages = 0.0, {}
        self._lock = asyncio.Lock()

    async def __call__(self) -> dict[str, bool]:
        async with self._lock:
            if time.monotonic() - self._checked > STATUS_CACHE_S:
                self._stages = await asyncio.to_thread(self._read)
                self._checked = time.monotonic()
        return self._stages

    def _read(self) -> dict[str, bool]:
        app = serve.status().applications.get(self.app_name)
        if app is None:
            return {}
        return {name: d.status in READY for name, d in app.deployments.items()}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle, decoder: DeploymentHandle) -> None:
        configure_ingress_logs()
        self.settings = get_settings()
        self.backend = GraphBackend(text_encoder, denoiser, decoder)
        self.service = SRPOService(self.backend, self.settings, ServeTelemetry())
        self.health = GraphHealth(serve.get_replica_context().app_name)

    def __serve_build_asgi_app__(self):
        return build_app(self.service, self.health)

    async def generate(self, body: FalInput) -> Output:
        """The handle API: `await serve.get_app_handle("srpo").generate.remote(TextToImageInput(...))`.

        File URLs start with `SRPO_PUBLIC_BASE_URL` (relative `/files/...` when unset); pass
        `sync_mode=True` to get the images inline as data URIs instead.
        """
        return await self.service.run(body, (self.settings.public_base_url or "").rstrip("/"))
