"""Ingress stage: the fal HTTP API (FastAPI) and the Python handle API over the stage graph."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import time
from typing import Callable

import torch
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
from deployments.denoise_router import denoise_steps, denoiser_view, image_tokens
from deployments.logs import configure_ingress_logs
from deployments.metrics import ServeTelemetry
from models.request import GenerationRequest, GenerationResult
from scheduling.split import plan_split
from server.app import build_app
from server.service import FalInput, LogSink, SRPOService, no_log
from server.telemetry import Telemetry
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

    def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle, decoder: DeploymentHandle,
                 telemetry: Telemetry) -> None:
        self.stages = {"text_encoder": text_encoder, "denoiser": denoiser, "decoder": decoder}
        self.telemetry = telemetry
        self.on_the_way = 0  # requests in `generate` that no Denoiser has started yet

    def has_room(self) -> bool:
        """Whether a Denoiser replica would admit one more request than those already on their way.
        Before the router's first report, or with no replica running (scaled to zero: a request at
        the handle is what starts one), only while none is on its way."""
        view = denoiser_view(self.stages["denoiser"].app_name)
        if view is None or view.cost is None or not view.curr_replicas:
            return self.on_the_way == 0
        return len(view.open_backlogs()) > self.on_the_way

    async def generate(
        self, request: GenerationRequest, *, enable_safety_checker: bool, acceleration: str, log: LogSink = no_log
    ) -> GenerationResult:
        self.on_the_way += 1
        left, arrived = False, time.perf_counter()
        view = denoiser_view(self.stages["denoiser"].app_name)
        # Scaled to zero: the call at the handle is what makes the autoscaler start a replica. Unknown
        # before this process's first Denoiser call (no router yet): not reported then.
        cold = view is not None and not view.curr_replicas

        def leave() -> None:
            nonlocal left
            if not left:
                left = True
                self.on_the_way -= 1

        def on_start() -> None:
            if cold and not left:
                waited = time.perf_counter() - arrived
                log(f"Cold start: waited {waited:.1f} s for a Denoiser replica to start")
                self.telemetry.cold_start(waited)
            leave()

        try:
            return await self._generate(request, enable_safety_checker, acceleration, log, on_start)
        finally:
            leave()

    async def _generate(self, request: GenerationRequest, enable_safety_checker: bool, acceleration: str,
                        log: LogSink, on_start: Callable[[], None]) -> GenerationResult:
        began = time.perf_counter()
        text, denoiser, decoder = self.stages.values()
        log("Encoding the prompt")
        embedding = text.encode.remote(request.prompt, request.loras)
        image_start = None
        if request.image is not None:
            log("Encoding the input image")
            image_start = decoder.encode_image.remote(
                request.image, request.height, request.width, request.seed, request.num_images
            )
        parts = self.parts(dataclasses.replace(request, image=None), acceleration)
        if len(parts) > 1:
            log(f"Splitting {request.num_images} images over {len(parts)} Denoiser replicas: "
                + ", ".join(str(part.samples) for part in parts))
        # Cancelling this coroutine cancels the streams, which takes the parts out of their engines.
        streams = [denoiser.options(stream=True).denoise.remote(part, embedding, image_start, acceleration)
                   for part in parts]
        try:
            latents = await self._follow(streams, request, log, on_start)
        except BaseException:
            for stream in streams:
                stream.cancel()  # leaving the iteration alone does not stop the replica's generator
            raise
        log("Decoding" + (" and checking safety" if enable_safety_checker else ""))
        decoded = await decoder.decode.remote(latents, request.height, request.width, enable_safety_checker)
        return GenerationResult(decoded.images, decoded.has_nsfw_concepts, request.seed, time.perf_counter() - began)

    def parts(self, request: GenerationRequest, acceleration: str) -> list[GenerationRequest]:
        """The Denoiser calls of a request: one, or several parts of its samples when replicas that
        admit work now would finish them sooner (scheduling/split.py)."""
        view = denoiser_view(self.stages["denoiser"].app_name)
        if request.num_images == 1 or view is None or view.cost is None:
            return [request]
        counts = plan_split(view.cost, image_tokens(request), request.num_images, denoise_steps(request),
                            acceleration, view.open_backlogs(), view.cost.part_overhead_s)
        starts = itertools.accumulate(counts, initial=0)
        return [dataclasses.replace(request, sample_range=(start, start + n)) for start, n in zip(starts, counts)]

    @staticmethod
    async def _follow(streams: list, request: GenerationRequest, log: LogSink,
                      on_start: Callable[[], None]) -> torch.Tensor:
        """Follow the parts' progress streams; log each step once all parts have done it; the latents
        of all parts in sample order. `on_start` runs when the first part starts."""
        done, latents, notes = [0] * len(streams), [None] * len(streams), set()
        started = False

        async def follow(i: int, stream) -> None:
            nonlocal started
            async for update in stream:
                if update.step == 0 and not started:
                    started = True
                    on_start()
                    log(f"Denoising {request.num_images} image(s) at {request.width}x{request.height}")
                if update.note and update.note not in notes:
                    notes.add(update.note)
                    log(update.note)
                before = min(done)
                done[i] = max(done[i], update.step)
                for step in range(before + 1, min(done) + 1):  # updates are coalesced
                    log(f"step {step}/{update.total}")
                if update.latents is not None:
                    latents[i] = update.latents

        tasks = [asyncio.ensure_future(follow(i, stream)) for i, stream in enumerate(streams)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one part failed: stop following the others
                task.cancel()
        return latents[0] if len(latents) == 1 else torch.cat(latents)

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


# max_ongoing_requests: held status polls. graceful_shutdown_timeout_s: Serve's drain, then the queue's
# (SRPO_QUEUE_DRAIN_S), as in serve_config.yaml.
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1024, graceful_shutdown_timeout_s=60)
@serve.ingress()
class Ingress:
    def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle, decoder: DeploymentHandle) -> None:
        configure_ingress_logs()
        self.settings = get_settings()
        # Serve freezes what the replica allocated at start; what requests keep young is collected this
        # rarely (Serve tunes its own proxy the same way; in HAProxy mode this replica is the proxy).
        gc.set_threshold(self.settings.ingress_gc_threshold)
        telemetry = ServeTelemetry()
        self.backend = GraphBackend(text_encoder, denoiser, decoder, telemetry)
        self.service = SRPOService(self.backend, self.settings, telemetry)
        self.health = GraphHealth(serve.get_replica_context().app_name)

    def __serve_build_asgi_app__(self):
        return build_app(self.service, self.health)

    async def generate(self, body: FalInput) -> Output:
        """The handle API: `await serve.get_app_handle("srpo").generate.remote(TextToImageInput(...))`.

        File URLs start with `SRPO_PUBLIC_BASE_URL` (relative `/files/...` when unset); pass
        `sync_mode=True` to get the images inline as data URIs instead.
        """
        return await self.service.run(body, (self.settings.public_base_url or "").rstrip("/"))
