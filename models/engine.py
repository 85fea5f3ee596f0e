"""Step-level batching of denoising requests (no Ray).

Before every transformer forward the engine picks which active requests run. One forward can
carry only one image size (the samples share position ids) and one module (an acceleration mode
may run compiled or fp8 blocks), so requests are grouped by (resolution, acceleration mode).

Policy "step" (the default, continuous batching): the oldest active request always runs and
fixes the forward's group; younger requests of that group join in arrival order while the
token budget allows (the oldest runs even if it alone exceeds it). A new request joins at the
next step and a finished or cancelled one leaves at once. No starvation: a request of another
group waits only while an older request is active, and every request has finitely many steps,
so each one becomes the oldest and runs; its wait is bounded by the older requests' remaining
steps, never by later arrivals.

Policy "request" (request-level batching, for comparison in benchmarks only): the same rule
forms a batch, which then runs until all of its members have finished or left; only then is
the next batch formed. Later arrivals wait for the whole batch, as with `@serve.batch`.

The forward runs in a worker thread so the caller's event loop stays responsive. A caller
cancels by cancelling its future: the request leaves before the next forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Literal

from diffusers import FluxTransformer2DModel

from models.denoise import DenoiseState, denoise_step

logger = logging.getLogger(__name__)

TEXT_TOKENS = 512

StepHook = Callable[[int, int], None]  # (steps done, steps in the request's schedule)
Policy = Literal["step", "request"]


def tokens_per_sample(state: DenoiseState) -> int:
    return state.latents.shape[1] + TEXT_TOKENS


@dataclass(order=True)
class _Job:
    order: int
    state: DenoiseState = field(compare=False)
    future: asyncio.Future = field(compare=False)
    on_step: StepHook | None = field(compare=False, default=None)
    mode: str = field(compare=False, default="none")

    @property
    def group(self) -> tuple[tuple[int, int], str]:
        return self.state.resolution, self.mode


class DenoiseEngine:
    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        max_batch_tokens: int,
        *,
        modules: Mapping[str, FluxTransformer2DModel] | None = None,
        policy: Policy = "step",
    ) -> None:
        """`modules` maps acceleration modes to the module each runs; "none" is `transformer`."""
        if policy not in ("step", "request"):
            raise ValueError(f"unknown batching policy {policy!r}")
        self.transformer = transformer
        self.modules = {**(modules or {}), "none": transformer}
        self.max_batch_tokens = max_batch_tokens
        self.policy = policy
        self._jobs: list[_Job] = []
        self._batch: list[_Job] = []  # policy "request": the batch that runs until its members leave
        self._counter = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.batch_sizes: Counter[int] = Counter()  # samples per forward -> number of forwards

    @property
    def failure(self) -> BaseException | None:
        """Why the engine's loop ended, if it did (a forward's own failure only fails its requests)."""
        if self._task is None or not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception() or RuntimeError("the engine loop returned")

    @property
    def active(self) -> int:
        """Requests queued or being denoised (cancelled ones leave before the next forward)."""
        return sum(not j.future.done() for j in self._jobs)

    def submit(self, state: DenoiseState, on_step: StepHook | None = None, *, mode: str = "none") -> asyncio.Future:
        """Queue a request to run with `mode`'s module; the future resolves to its final packed latents.

        `on_step(done, total)` runs on the event loop after each forward that advanced it.
        """
        if mode not in self.modules:
            raise ValueError(f"no module for acceleration mode {mode!r}; this engine has {sorted(self.modules)}")
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()  # a fresh loop (e.g. a second asyncio.run) needs its own event
            self._task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(next(self._counter), state, future, on_step, mode))
        self._wake.set()
        return future

    async def aclose(self) -> None:
        """Stop the engine's loop (for owners that drop an engine while their event loop lives on)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _pick(self) -> list[_Job]:
        self._jobs = [j for j in self._jobs if not j.future.done()]  # cancelled by the caller
        if self.policy == "request":
            self._batch = [j for j in self._batch if not j.future.done()]
            if self._batch:
                return self._batch
        if not self._jobs:
            return []
        group = min(self._jobs).group
        chosen, used = [], 0
        for job in sorted(self._jobs):
            if job.group != group:
                continue
            cost = tokens_per_sample(job.state) * job.state.num_samples
            if chosen and used + cost > self.max_batch_tokens:
                continue
            chosen.append(job)
            used += cost
        self._batch = chosen
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
                await asyncio.to_thread(denoise_step, self.modules[batch[0].mode], states)
            except Exception as exc:  # a failed forward fails its requests, not the engine
                logger.exception("denoising step failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.batch_sizes[sum(s.num_samples for s in states)] += 1
            for job in batch:
                if job.on_step is not None and not job.future.done():
                    try:
                        job.on_step(job.state.step, job.state.schedule.num_steps)
                    except Exception:  # a broken progress consumer must not stop the engine
                        logger.exception("progress hook failed")
                if job.state.done and not job.future.done():  # the hook may have cancelled it
                    job.future.set_result(job.state.latents)
            self._jobs = [j for j in self._jobs if not j.state.done]
