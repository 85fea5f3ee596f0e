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


@dataclass
class GenerationResult:
    images: list[np.ndarray]  # uint8 HxWx3
    has_nsfw_concepts: list[bool]
    seed: int
    inference_seconds: float
    latents: torch.Tensor | None = None  # final packed latents (num_images, L, 64), when kept
