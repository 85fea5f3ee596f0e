"""Step-level batching of denoising requests: the mechanism (no Ray).

Before every transformer forward the engine asks its policy (scheduling/policy.py) which active
requests run; the policy sees only `Active` records, so it is tested and simulated without a
model. One forward carries one image size (the samples share position ids) and one module (an
acceleration mode may run compiled or fp8 blocks): the policy picks within one group. A new
request can join at the next forward; a finished or cancelled one leaves at once. Pixels never
depend on the policy: every sample follows its own schedule whatever shares its forward.

The forward runs in a worker thread so the caller's event loop stays responsive. A caller
cancels by cancelling its future: the request leaves before the next forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

from diffusers import FluxTransformer2DModel

from models.denoise import DenoiseState, denoise_step
from models.lora_layers import LoraBank
from models.device import ForwardTimer
from scheduling.policy import Active, CoBatch, Policy

logger = logging.getLogger(__name__)


StepHook = Callable[[int, int], None]  # (steps done, steps in the request's schedule)


@dataclass
class _Job:
    order: int
    arrived_s: float
    state: DenoiseState
    future: asyncio.Future
    on_step: StepHook | None = None
    mode: str = "none"

    def view(self) -> Active:
        state = self.state
        return Active(
            key=self.order,
            arrived_s=self.arrived_s,
            group=(state.resolution, self.mode),
            image_tokens=state.latents.shape[1],
            samples=state.num_samples,
            mode=self.mode,
            remaining_steps=state.schedule.num_steps - state.step,
            total_steps=state.schedule.num_steps,
        )


class DenoiseEngine:
    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        max_batch_tokens: int,
        *,
        modules: Mapping[str, FluxTransformer2DModel] | None = None,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
        loras: LoraBank | None = None,
    ) -> None:
        """`modules` maps acceleration modes to the module each runs; "none" is `transformer`.
        `loras`: the LoRA bank attached to `transformer` (its modules share it), for states with adapters.

        `policy` defaults to co-batching in arrival order within `max_batch_tokens`.
        """
        self.transformer = transformer
        self.modules = {**(modules or {}), "none": transformer}
        self.max_batch_tokens = max_batch_tokens
        self.policy = policy or CoBatch(max_batch_tokens)
        self.clock = clock
        self.loras = loras
        self._jobs: list[_Job] = []
        self._counter = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.batch_sizes: Counter[int] = Counter()  # samples per forward -> number of forwards
        # distinct LoRA adapters in a forward (no adapter counts as one) -> forwards: > 1 is a mixed forward
        self.adapters_per_forward: Counter[int] = Counter()
        self.most_active = 0  # the most requests it held at once (work should wait in front, not here)
        # (image tokens per sample, samples) -> [forwards, seconds]: the step costs this device really sees,
        # timed with device events on a GPU (models/device.py)
        self.forward_seconds: dict[tuple[int, int], list[float]] = {}
        self.timer = ForwardTimer()

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
        job = _Job(next(self._counter), self.clock(), state, future, on_step, mode)
        self._jobs.append(job)
        self.most_active = max(self.most_active, self.active)
        self.policy.admitted(job.view(), job.arrived_s)
        self._wake.set()
        return future

    async def aclose(self) -> None:
        """Stop the engine's loop (for owners that drop an engine while their event loop lives on)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def views(self) -> list[Active]:
        """The active requests as the policy sees them."""
        return [j.view() for j in self._jobs if not j.future.done()]

    def _pick(self) -> list[_Job]:
        self._jobs = [j for j in self._jobs if not j.future.done()]  # cancelled by the caller
        by_key = {j.order: j for j in self._jobs}
        chosen = self.policy.pick([j.view() for j in self._jobs], self.clock())
        if len({a.group for a in chosen}) > 1:
            raise RuntimeError(f"policy {self.policy.name!r} mixed groups in one forward")
        return [by_key[a.key] for a in chosen]

    def _forward(self, module: FluxTransformer2DModel, states: list[DenoiseState], samples: int) -> None:
        began = self.timer.start(states[0].latents.device)
        denoise_step(module, states, self.loras)
        self.timer.stop(began, (states[0].latents.shape[1], samples))

    async def _run(self) -> None:
        while True:
            batch = self._pick()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            states = [j.state for j in batch]
            samples = sum(s.num_samples for s in states)
            try:
                await asyncio.to_thread(self._forward, self.modules[batch[0].mode], states, samples)
            except Exception as exc:  # a failed forward fails its requests, not the engine
                logger.exception("denoising step failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.batch_sizes[samples] += 1
            self.adapters_per_forward[len({s.adapter for s in states})] += 1
            for key, seconds in self.timer.finished():
                tally = self.forward_seconds.setdefault(key, [0, 0.0])
                tally[0] += 1
                tally[1] += seconds
            for job in batch:
                if job.on_step is not None and not job.future.done():
                    try:
                        job.on_step(job.state.step, job.state.schedule.num_steps)
                    except Exception:  # a broken progress consumer must not stop the engine
                        logger.exception("progress hook failed")
                if job.state.done and not job.future.done():  # the hook may have cancelled it
                    job.future.set_result(job.state.latents)
            self._jobs = [j for j in self._jobs if not j.state.done]
