"""The project's Prometheus metrics, through Ray Serve's metrics API.

Every replica exports its own series (Serve adds the deployment, replica and application tags) on
the node's metrics port; Ray prefixes `ray_` to each name and appends `_total` to counters, so
`srpo_requests` is scraped as `ray_srpo_requests_total`. Names follow vLLM's and SGLang's
(`num_requests_waiting`, `e2e_request_latency_seconds`, `request_queue_time_seconds`, ...).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from contextlib import contextmanager
from typing import Any, Iterator

from ray.serve.metrics import Counter, Gauge, Histogram

from models.denoise import DenoiseState
from models.engine import DenoiseEngine, StepHook
from server.telemetry import Telemetry

REQUEST_BUCKETS_S = [0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600]
STAGE_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120]
STEP_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10]
# Ray's agent rebuilds a histogram's sum from bucket midpoints: with bounds between the integers a
# batch size's midpoint is the size itself (up to 8), so the mean batch size is exact.
BATCH_BUCKETS = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 12.5, 16.5, 24.5, 32.5, 64.5]
REQUEST_TAGS = ("endpoint", "mode")


class ServeTelemetry(Telemetry):
    """The ingress replica's request, queue and retry metrics (see server/telemetry.py for the events)."""

    def __init__(self) -> None:
        self._latency = Histogram(
            "srpo_e2e_request_latency_seconds", description="Arrival (queue submission) to the end of a request.",
            boundaries=REQUEST_BUCKETS_S, tag_keys=(*REQUEST_TAGS, "outcome"))
        self._requests = Counter(
            "srpo_requests", description="Finished requests; outcome ok or error.", tag_keys=(*REQUEST_TAGS, "outcome"))
        self._errors = Counter(
            "srpo_request_errors", description="Failed requests by fal error type (input_error, request_timeout, ...).",
            tag_keys=(*REQUEST_TAGS, "error_type"))
        self._running = Gauge(
            "srpo_num_requests_running", description="Requests this ingress replica is running.", tag_keys=("mode",))
        self._waiting = Gauge(
            "srpo_num_requests_waiting",
            description="Queued requests not yet claimed (the shared store's count, as each ingress replica sees it).")
        self._queue_time = Histogram(
            "srpo_request_queue_time_seconds", description="Queue submission to a request's first claim.",
            boundaries=REQUEST_BUCKETS_S)
        self._retries = Counter(
            "srpo_request_retries", description="Request runs again: replica_failure (a stage died) or requeued "
            "(its ingress replica's lease ran out).", tag_keys=("reason",))
        self._images = Counter("srpo_images_generated", description="Images of successful requests.")
        self._cold_start = Histogram(
            "srpo_cold_start_seconds", description="Wait of a request that arrived with no Denoiser replica "
            "running (scaled to zero) until one started it.", boundaries=REQUEST_BUCKETS_S)
        self._levels: dict[str, int] = {}  # running requests by mode


    def request_finished(self, endpoint: str, mode: str, seconds: float, error_type: str | None) -> None:
        tags = {"endpoint": endpoint, "mode": mode, "outcome": "ok" if error_type is None else "error"}
        self._latency.observe(seconds, tags)
        self._requests.inc(1, tags)
        if error_type is not None:
            self._errors.inc(1, {"endpoint": endpoint, "mode": mode, "error_type": error_type})

    def requests_running(self, mode: str, count: int) -> None:
        self._levels[mode] = count
        self._running.set(count, {"mode": mode})

    def requests_waiting(self, count: int) -> None:
        # Ray's agent drops a gauge not set for two report intervals; the queue worker calls this every
        # tick, so every level is set again here and an idle mode's 0 stays exported.
        self._waiting.set(count)
        for mode, running in self._levels.items():
            self._running.set(running, {"mode": mode})

    def queue_wait(self, seconds: float) -> None:
        self._queue_time.observe(seconds)

    def retried(self, reason: str) -> None:
        self._retries.inc(1, {"reason": reason})

    def images_generated(self, count: int) -> None:
        if count:
            self._images.inc(count)

    def cold_start(self, seconds: float) -> None:
        self._cold_start.observe(seconds)


class StageMetrics:
    """One stage replica's batch sizes and per-request latency, tagged with the stage's name."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._batch = Histogram(
            "srpo_batch_size",
            description="Items per batched call of a stage (prompts, decoded requests, denoiser samples per forward).",
            boundaries=BATCH_BUCKETS, tag_keys=("stage",))
        self._latency = Histogram(
            "srpo_stage_latency_seconds",
            description="Time a request spends in a stage: its text encoding batch, its denoising (from entering "
            "the engine to its last step), its decode + safety check batch.",
            boundaries=STAGE_BUCKETS_S, tag_keys=("stage",))
        for metric in (self._batch, self._latency):
            metric.set_default_tags({"stage": stage})

    def batch(self, size: int) -> None:
        self._batch.observe(size)

    def latency(self, seconds: float, requests: int = 1) -> None:
        for _ in range(requests):
            self._latency.observe(seconds)

    @contextmanager
    def timed(self, requests: int) -> Iterator[None]:
        """Observe the block's duration for each of the `requests` it served together."""
        began = time.perf_counter()
        yield
        self.latency(time.perf_counter() - began, requests)


class SafetyMetrics:
    def __init__(self) -> None:
        self._flagged = Counter("srpo_nsfw_flagged_images", description="Images the safety checker blacked out.")

    def flagged(self, count: int) -> None:
        if count:
            self._flagged.inc(count)


class ObservedEngine:
    """The Denoiser's DenoiseEngine, observed from its public surface only (`submit`'s progress hook
    and future, the `batch_sizes` tally of forwards), so the scheduler inside may change freely.
    Everything but `submit` is the engine's own."""

    def __init__(self, engine: DenoiseEngine, stage: StageMetrics) -> None:
        self._engine = engine
        self._stage = stage
        self._forwards_seen: Tally[int] = Tally(engine.batch_sizes)
        self._step = Histogram(
            "srpo_diffusion_step_seconds",
            description="Time between a request's consecutive denoising steps: one transformer forward while the "
            "request runs in every forward, more while other requests' forwards interleave.",
            boundaries=STEP_BUCKETS_S)
        self._cache_steps = Counter(
            "srpo_step_cache_sample_steps",
            description="Sample-steps by the step cache's decision: reused (the blocks after the first skipped) or "
            "computed (every block ran; all steps of requests without a cache).", tag_keys=("result",))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, state: DenoiseState, on_step: StepHook | None = None, *, mode: str = "none") -> asyncio.Future:
        began = last = time.perf_counter()
        steps = 0

        def observed(done: int, total: int) -> None:
            nonlocal last, steps
            now = time.perf_counter()
            if steps:  # the first step's wait includes the request's admission
                self._step.observe(now - last)
            last, steps = now, steps + 1
            self._record_forwards()
            if on_step is not None:
                on_step(done, total)

        def finished(future: asyncio.Future) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            self._stage.latency(time.perf_counter() - began)
            cache = state.cache
            if cache is None:
                self._count_cache_steps(0, steps * state.num_samples)
            else:  # the reuse count lives on the device: read it off the event loop
                asyncio.get_running_loop().run_in_executor(
                    None, lambda: self._count_cache_steps(cache.reused, cache.computed))

        future = self._engine.submit(state, observed, mode=mode)
        future.add_done_callback(finished)
        return future

    def _count_cache_steps(self, reused: int, computed: int) -> None:
        for result, count in (("reused", reused), ("computed", computed)):
            if count:  # a Ray counter only takes positive increments
                self._cache_steps.inc(count, {"result": result})

    def _record_forwards(self) -> None:
        """Every forward since the last look, by its samples (each forward's hooks run right after it)."""
        new = Tally(self._engine.batch_sizes) - self._forwards_seen
        for size, count in new.items():
            for _ in range(count):
                self._stage.batch(size)
        self._forwards_seen += new


LOAD_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]


class LoraMetrics:
    """A replica's LoRA tiers: hits and misses per tier, load time, resident adapter sets."""

    def __init__(self, stage: str) -> None:
        self._events = Counter(
            "srpo_lora_cache_events", description="LoRA lookups by tier (host: parsed files, device: adapter sets in "
            "GPU slots) and result (hit, miss).", tag_keys=("stage", "tier", "result"))
        self._load = Histogram(
            "srpo_lora_load_seconds", description="Making a request's LoRA set device-resident (read, combine, copy).",
            boundaries=LOAD_BUCKETS_S, tag_keys=("stage",))
        self._resident = Gauge(
            "srpo_lora_resident_adapters", description="LoRA sets resident in a replica's device slots.",
            tag_keys=("stage",))
        for metric in (self._events, self._load, self._resident):
            metric.set_default_tags({"stage": stage})
        self._seen: Tally[str] = Tally()

    def update(self, stats: Tally[str], resident: int) -> None:
        """Export what changed in the residency's running `stats` since the last update."""
        for event in ("host_hit", "host_miss", "device_hit", "device_miss"):
            if delta := stats[event] - self._seen[event]:
                tier, result = event.split("_")
                self._events.inc(delta, {"tier": tier, "result": result})
        if (loads := stats["loads"] - self._seen["loads"]) > 0:
            seconds = (stats["load_s_total"] - self._seen["load_s_total"]) / loads
            for _ in range(int(loads)):
                self._load.observe(seconds)
        self._seen = Tally(stats)
        self._resident.set(resident)
