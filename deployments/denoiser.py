"""Denoiser stage: the SRPO transformer behind the step-level batching engine (one GPU per replica)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

import torch
from ray import serve

from deployments.runtime import StageRuntime
from models.denoise import denoise_step
from models.engine import DenoiseEngine
from models.loading import load_scheduler_config, load_transformer
from models.pipeline import start_state
from models.request import GenerationRequest
from models.text_encoding import PromptEmbedding


@dataclass
class DenoiseUpdate:
    """One item of `Denoiser.denoise`'s stream: a start update (step 0), one per step, the latents last."""

    step: int
    total: int
    latents: torch.Tensor | None = None  # packed (num_images, L, 64) on CPU, in the last update only
    note: str | None = None  # something the request's logs should say (e.g. an acceleration fallback)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
class Denoiser:
    def __init__(self, max_batch_tokens: int = 16384) -> None:
        self.runtime = StageRuntime("denoiser")
        paths = self.runtime.paths
        self.scheduler_config = load_scheduler_config(paths.model_dir)
        self.transformer = load_transformer(
            paths.model_dir, self.runtime.device, self.runtime.dtype, paths.transformer_file
        )
        self.engine = DenoiseEngine(self.transformer, max_batch_tokens)
        self._warm_up()

    def _warm_up(self) -> None:
        dim = self.transformer.config.joint_attention_dim
        pooled_dim = self.transformer.config.pooled_projection_dim
        request = GenerationRequest(prompt="", width=256, height=256, num_inference_steps=1, guidance_scale=4.5, seed=0)
        state = start_state(
            request,
            self.scheduler_config,
            torch.zeros(1, 512, dim),
            torch.zeros(1, pooled_dim),
            self.runtime.device,
            self.runtime.dtype,
        )
        denoise_step(self.transformer, [state])

    async def denoise(
        self,
        request: GenerationRequest,
        embedding: PromptEmbedding,
        image_start: tuple[torch.Tensor, torch.Tensor] | None = None,
        acceleration: str = "none",
    ) -> AsyncIterator[DenoiseUpdate]:
        """Stream (call with `.options(stream=True)`): an update per step, the latents last.

        Cancelling the call removes the request from the engine before its next forward.
        """
        state = start_state(
            request,
            self.scheduler_config,
            embedding.prompt_embeds,
            embedding.pooled,
            self.runtime.device,
            self.runtime.dtype,
            image_start,
        )
        yield DenoiseUpdate(0, state.schedule.num_steps)
        updates: asyncio.Queue[DenoiseUpdate | None] = asyncio.Queue()
        future = self.engine.submit(state, lambda done, total: updates.put_nowait(DenoiseUpdate(done, total)))
        future.add_done_callback(lambda _: updates.put_nowait(None))
        try:
            while (update := await updates.get()) is not None:
                if update.step < update.total:
                    yield update
            latents = future.result()
            yield DenoiseUpdate(state.step, state.schedule.num_steps, latents.cpu())
        finally:
            future.cancel()

    def stats(self) -> dict:
        return {"batch_sizes": dict(self.engine.batch_sizes), "active": self.engine.active}

    def ping(self) -> bool:
        return True
