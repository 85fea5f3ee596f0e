"""Denoiser stage: the SRPO transformer behind the step-level batching engine (one GPU per replica).

Each acceleration mode that can run here gets its module (models/acceleration.py) at start; on a
GPU the compiled modes are compiled and warmed up for the configured shapes before the replica
reports ready, so no request waits for a compile. The batching itself is models/engine.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence

import torch
from ray import serve

from deployments.denoise_router import LeastWorkRouter, adapter_id, request_work_s
from deployments.lora_runtime import ReplicaLoras
from deployments.metrics import ObservedEngine
from deployments.runtime import ReplicaHealth, StageRuntime, logger
from models.acceleration import MODES, WARMUP_BATCH_SIZES, WARMUP_SIZES, Accelerator
from models.attention import set_attention_backend
from models.denoise import start_state
from models.lora_layers import NO_ADAPTER
from models.device import copy_to_host, ready_marker
from models.engine import DenoiseEngine
from models.loading import load_scheduler_config, load_transformer
from models.request import GenerationRequest
from models.text_encoding import PromptEmbedding
from scheduling.cost_model import CostModel, default_profile_path
from scheduling.dispatch import REQUEST_S_WEIGHT, backlog_s, replica_load
from scheduling.policy import Waiting, make_policy
from server.queue.store import RequestStore, open_store


@dataclass
class DenoiseUpdate:
    """One item of `Denoiser.denoise`'s stream: a start update (step 0), progress, the latents last.

    Progress is coalesced: `step` is the number of steps done so far, not every step is sent.
    """

    step: int
    total: int
    latents: torch.Tensor | None = None  # packed (num_images, L, 64) on CPU, in the last update only
    note: str | None = None  # something the request's logs should say (e.g. an acceleration fallback)


PROGRESS_INTERVAL_S = 0.1
FAL_DEFAULT_REQUEST = (3072, 28)  # landscape_4_3 (1024x768) image tokens, 28 steps: the work guess before any request
ROUTING_STATS_PERIOD_S = 0.1  # how often Serve asks for record_routing_stats; routers see it a little later


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=32,
    request_router_config=serve.config.RequestRouterConfig(
        request_router_class=LeastWorkRouter,
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        initial_backoff_s=0.01,
        max_backoff_s=0.05,  # a waiting request looks again at least this often
    ),
)
class Denoiser(ReplicaHealth):
    def __init__(
        self,
        max_batch_tokens: int = 16384,
        acceleration_modes: Sequence[str] = MODES,
        warmup_sizes: Sequence[tuple[int, int]] = WARMUP_SIZES,
        warmup_batch_sizes: Sequence[int] = WARMUP_BATCH_SIZES,
        compile_cache_dir: str | None = None,
        policy: str = "cost",
    ) -> None:
        self.runtime = StageRuntime("denoiser")
        self.replica_key = uuid.uuid4().hex  # tells replicas apart in stats(), in Serve or not
        paths = self.runtime.paths
        self.scheduler_config = load_scheduler_config(paths.model_dir)
        self.transformer = load_transformer(
            paths.model_dir, self.runtime.device, self.runtime.dtype, paths.transformer_file
        )
        # Before the acceleration modes copy or compile the blocks: every mode's module shares the bank.
        self.loras = ReplicaLoras(self.transformer, "transformer", "denoiser", self.runtime.settings)
        backend = set_attention_backend(self.transformer, self.runtime.settings.attention_backend)
        logger.info("denoiser replica: attention backend %s", backend)
        cache_dir = Path(compile_cache_dir) if compile_cache_dir else None
        self.accelerator = Accelerator(self.transformer, acceleration_modes, compile_cache_dir=cache_dir,
                                       compile_on_cpu=self.runtime.settings.compile_on_cpu)
        self.cost_profile = self.runtime.settings.cost_profile or default_profile_path(self.runtime.device.type)
        self.cost = CostModel.load(self.cost_profile)
        engine = DenoiseEngine(
            self.transformer,
            max_batch_tokens,
            modules=self.accelerator.modules,
            policy=make_policy(policy, self.cost, max_batch_tokens, admit_ahead_s=2 * ROUTING_STATS_PERIOD_S),
            loras=self.loras.bank,
        )
        self.engine = ObservedEngine(engine, self.runtime.metrics)  # metrics: see deployments/metrics.py
        # For the autoscaler only (record_autoscaling_stats): the request store's waiting count, which
        # Serve's controller cannot see, and the mean work of this replica's recent requests.
        self.store: RequestStore | None = None  # opened on the first autoscaling report
        self.store_waiting = 0
        self.arriving_s = 0.0  # estimated work of requests received and not yet in the engine
        tokens, steps = FAL_DEFAULT_REQUEST
        self.request_s = steps * self.cost.step_s(tokens, 1)
        self.accelerator.warm_up(self.scheduler_config, self.runtime.dtype, warmup_sizes, warmup_batch_sizes,
                                 loras=self.loras.bank)
        self.runtime.log_peak_memory()

    async def denoise(
        self,
        request: GenerationRequest,
        embedding: PromptEmbedding,
        image_start: tuple[torch.Tensor, torch.Tensor] | None = None,
        acceleration: str = "none",
        front: tuple[str, Waiting] | None = None,
    ) -> AsyncIterator[DenoiseUpdate]:
        """Stream (call with `.options(stream=True)`): progress updates, the latents last.

        Cancelling the call removes the request from the engine before its next forward. An
        `acceleration` this replica cannot run falls back (see models/acceleration.py); the first
        update's note says so. `front` is filled in by LeastWorkRouter, not by callers: the router
        and what still waits in it.
        """
        if front is not None:
            self.engine.policy.front.report(front[0], front[1], self.engine.clock())
        mode, note = self.accelerator.resolve(acceleration)
        work = request_work_s(self.cost, request, mode)
        self.request_s += REQUEST_S_WEIGHT * (work - self.request_s)
        self.arriving_s += work  # reported as backlog until the engine holds it (routers must see it now)
        adapter = NO_ADAPTER
        try:
            # The request waits here, not in the engine, until its LoRAs are device-resident.
            adapter = await self.loras.acquire(request.loras)
            state = await asyncio.to_thread(  # copies to the device: off the event loop
                start_state,
                request,
                self.scheduler_config,
                embedding.prompt_embeds,
                embedding.pooled,
                self.runtime.device,
                self.runtime.dtype,
                image_start,
            )
            state.cache = self.accelerator.step_cache(mode)
            state.adapter = adapter
            updates: asyncio.Queue[DenoiseUpdate | None] = asyncio.Queue()
            ready = []

            def on_step(done: int, total: int) -> None:
                if done == total:  # right after the last forward, before the engine queues another
                    ready.append(ready_marker(self.runtime.device))
                updates.put_nowait(DenoiseUpdate(done, total))

            future = self.engine.submit(state, on_step, mode=mode)
        except BaseException:
            self.loras.release(adapter)
            raise
        finally:
            self.arriving_s -= work
        future.add_done_callback(lambda _: updates.put_nowait(None))
        future.add_done_callback(lambda _: self.loras.release(adapter))
        try:
            yield DenoiseUpdate(0, state.schedule.num_steps, note=note)
            sent = time.monotonic()
            while (update := await updates.get()) is not None:
                # Each stream item costs a message through Ray: send progress at most every
                # PROGRESS_INTERVAL_S; the receiver logs every step up to the one it is told.
                if update.step < update.total and time.monotonic() - sent >= PROGRESS_INTERVAL_S:
                    sent = time.monotonic()
                    yield update
            latents = await asyncio.to_thread(copy_to_host, future.result(), *ready[-1:])
            yield DenoiseUpdate(state.step, state.schedule.num_steps, latents)
        finally:
            future.cancel()

    def stats(self) -> dict:
        return {
            "batch_sizes": dict(self.engine.batch_sizes),
            "active": self.engine.active,
            "most_active": self.engine.most_active,
            "acceleration_modes": sorted(self.accelerator.modules),
            "policy": self.engine.policy.name,
            "replica": self.replica_key,
            "forward_seconds": {f"{tokens}x{samples}": tally for (tokens, samples), tally in
                                self.engine.forward_seconds.items()},
            "adapters_per_forward": dict(self.engine.adapters_per_forward),
            "loras": self.loras.stats(),
        }

    def record_routing_stats(self) -> dict:
        """What LeastWorkRouter reads (Serve polls it): estimated backlog and admission horizon."""
        self.engine.policy.replicas = serve.get_replica_context().world_size
        load = replica_load(self.cost, self.engine.policy, self.engine.views(), self.engine.clock(),
                            arriving_s=self.arriving_s)
        return {"load": dataclasses.asdict(load), "at_s": time.time(), "cost_profile": str(self.cost_profile),
                "loras": [adapter_id(key) for key in self.loras.residency.resident()],
                "lora_slots": self.loras.bank.slots - 1}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What the Denoiser's autoscaling policy reads (deployments/autoscaling.py): this replica's
        estimated backlog, the mean work of its recent requests, and the requests waiting in the
        request store (every replica reads the same count; the policy takes the largest). The count
        is also part of the queue in front that the engine's policy batches by."""
        try:
            self.store = self.store or open_store(self.runtime.settings)
            self.store_waiting = await self.store.pending()
        except Exception:  # an unreachable store: keep the last count (the queue itself reports the outage)
            pass
        waiting = Waiting(self.store_waiting, self.store_waiting * self.request_s)
        self.engine.policy.front.report("request store", waiting, self.engine.clock())
        return {"backlog_s": backlog_s(self.cost, self.engine.views()) + self.arriving_s,
                "request_s": self.request_s, "store_waiting": float(self.store_waiting)}

    async def check_health(self) -> None:
        if (failure := self.engine.failure) is not None:
            raise RuntimeError(f"the denoising engine stopped: {failure!r}")
        await super().check_health()
