"""What one generation asks for and what it gives, in model terms (sizes already rounded and validated)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int = 1
    # image-to-image: the source image (already RGB) and how much of the schedule to run
    image: Image.Image | None = None
    strength: float = 1.0
    # A request split across Denoiser replicas (scheduling/split.py): this call denoises samples
    # [start, stop) of the num_images whose noise the seed draws.
    sample_range: tuple[int, int] | None = None

    @property
    def samples(self) -> int:
        """The samples this call denoises."""
        return self.num_images if self.sample_range is None else self.sample_range[1] - self.sample_range[0]


@dataclass
class GenerationResult:
    images: list[np.ndarray]  # uint8 HxWx3
    has_nsfw_concepts: list[bool]
    seed: int
    inference_seconds: float
    latents: torch.Tensor | None = None  # final packed latents (num_images, L, 64), when kept
