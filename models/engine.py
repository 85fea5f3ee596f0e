"""Step-level batching of denoising requests (no Ray).

Before every transformer forward the engine picks which active requests run: those of the
oldest waiting request's resolution, in arrival order, under a token budget. The oldest request
always runs, so nothing starves; a new request joins at the next step and a finished one leaves
at once. The forward runs in a worker thread so the caller's event loop stays responsive.
A caller cancels by cancelling its future: the request leaves before the next forward.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import FluxTransformer2DModel

from models.denoise import DenoiseState, denoise_step

logger = logging.getLogger(__name__)

TEXT_TOKENS = 512

StepHook = Callable[[int, int], None]  # (steps done, steps in the request's schedule)


def tokens_per_sample(state: DenoiseState) -> int:
    return state.latents.shape[1] + TEXT_TOKENS


@dataclass(order=True)
class _Job:
    order: int
    state: DenoiseState = field(compare=False)
    future: asyncio.Future = field(compare=False)
    on_step: StepHook | None = field(compare=False, default=None)


class DenoiseEngine:
    def __init__(self, transformer: FluxTransformer2DModel, max_batch_tokens: int) -> None:
        self.transformer = transformer
        self.max_batch_tokens = max_batch_tokens
        self._jobs: list[_Job] = []
        self._counter = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.batch_sizes: Counter[int] = Counter()  # samples per forward -> number of forwards

    @property
    def active(self) -> int:
        """Requests queued or being denoised (cancelled ones leave before the next forward)."""
        return sum(not j.future.done() for j in self._jobs)

    def submit(self, state: DenoiseState, on_step: StepHook | None = None) -> asyncio.Future:
        """Queue a request; the future resolves to its final packed latents.

        `on_step(done, total)` runs on the event loop after each forward that advanced it.
        """
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(next(self._counter), state, future, on_step))
        self._wake.set()
        return future

    def _pick(self) -> list[_Job]:
        self._jobs = [j for j in self._jobs if not j.future.done()]  # cancelled by the caller
        if not self._jobs:
            return []
        oldest = min(self._jobs)
        chosen, used = [], 0
        for job in sorted(self._jobs):
            if job.state.resolution != oldest.state.resolution:
                continue
            cost = tokens_per_sample(job.state) * job.state.num_samples
            if chosen and used + cost > self.max_batch_tokens:
                continue
            chosen.append(job)
            used += cost
        return chosen

    async def _run(self) -> None:
        while True:
            batch = self._pick()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            states = [j.state for j in batch]
            try:
                await asyncio.to_thread(denoise_step, self.transformer, states)
            except Exception as exc:  # a failed forward fails its requests, not the engine
                logger.exception("denoising step failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.batch_sizes[sum(s.num_samples for s in states)] += 1
            for job in batch:
                if job.future.done():
                    continue
                if job.on_step is not None:
                    try:
                        job.on_step(job.state.step, job.state.schedule.num_steps)
                    except Exception:  # a broken progress consumer must not stop the engine
                        logger.exception("progress hook failed")
                if job.state.done:
                    job.future.set_result(job.state.latents)
            self._jobs = [j for j in self._jobs if not j.state.done]
