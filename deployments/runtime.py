"""What every stage's replica shares: the settings, the resolved weights, the stage's metrics and
the health check Serve calls."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import torch
from deployments.metrics import StageMetrics
from models.loading import ModelPaths, resolve_model_paths
from settings import Settings, get_settings

logger = logging.getLogger("ray.serve")


class StageRuntime:
    """Settings, weight paths, device and dtype for one replica, plus its batch sizes and metrics."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.settings: Settings = get_settings()
        s = self.settings
        self.paths: ModelPaths = resolve_model_paths(s.model_dir, s.safety_dir, s.transformer_file, s.tiny_dir)
        self.device: torch.device = self.settings.resolved_device()
        self.dtype: torch.dtype = self.settings.resolved_dtype()
        self.batch_sizes: Counter[int] = Counter()
        self.metrics = StageMetrics(stage)
        logger.info("%s replica: %s on %s (%s)", stage, self.paths.model_dir, self.device, self.dtype)

    def log_peak_memory(self) -> dict[str, float]:
        """After warm-up: the device memory this replica peaked at (GiB), for the memory plan
        (models/memory_plan.py) to be checked against; empty off CUDA."""
        if self.device.type != "cuda":
            return {}
        peak = {"allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
                "reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2**30}
        logger.info("%s replica: peak GPU memory after warm-up %.2f GiB allocated, %.2f GiB reserved",
                    self.stage, peak["allocated_gib"], peak["reserved_gib"])
        return peak

    def record_batch(self, size: int) -> None:
        self.batch_sizes[size] += 1
        self.metrics.batch(size)


class ReplicaHealth:
    """Serve's `check_health` for a stage: a replica that cannot serve fails it, and Serve replaces it
    (its in-flight requests finish while it drains, or run again elsewhere)."""

    runtime: StageRuntime
    _fault: str | None = None

    async def check_health(self) -> None:
        if self._fault is not None:
            raise RuntimeError(f"injected fault: {self._fault}")
        # A lost or faulty device (Xid errors, ECC) fails the smallest op; in a thread, since on a GPU
        # it waits for the forward in flight.
        await asyncio.to_thread(lambda: torch.ones(1, device=self.runtime.device).add_(1).cpu())

    def inject_fault(self, reason: str) -> None:
        """Chaos testing only (SRPO_FAULT_INJECTION=true): fail every later health check."""
        if not self.runtime.settings.fault_injection:
            raise PermissionError("fault injection is off (SRPO_FAULT_INJECTION)")
        logger.warning("%s replica: health checks will fail from now on (%s)", self.runtime.stage, reason)
        self._fault = reason
