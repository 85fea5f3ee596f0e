"""What every stage's replica shares: the settings, the resolved weights, and the batch-size metric."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from ray.serve.metrics import Histogram

from models.loading import ModelPaths, resolve_model_paths
from settings import Settings, get_settings

logger = logging.getLogger("ray.serve")


class StageRuntime:
    """Settings, weight paths, device and dtype for one replica, plus its batch-size record."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.settings: Settings = get_settings()
        s = self.settings
        self.paths: ModelPaths = resolve_model_paths(s.model_dir, s.safety_dir, s.transformer_file, s.tiny_dir)
        self.device: torch.device = self.settings.resolved_device()
        self.dtype: torch.dtype = self.settings.resolved_dtype()
        self.batch_sizes: Counter[int] = Counter()
        self._histogram = Histogram(
            "srpo_batch_size",
            description="Items per batched call of a stage (prompts, decoded requests, denoiser samples).",
            boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32],
            tag_keys=("stage",),
        )
        self._histogram.set_default_tags({"stage": stage})
        logger.info("%s replica: %s on %s (%s)", stage, self.paths.model_dir, self.device, self.dtype)

    def record_batch(self, size: int) -> None:
        self.batch_sizes[size] += 1
        self._histogram.observe(size)
