"""What one generation asks for and what it gives, in model terms (sizes already rounded and validated)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class LoraRef:
    """A LoRA a request applies: where it came from, the local file holding it, its identity, its scale."""

    source: str  # the request's `path` (URL, s3://, Hugging Face repo id or local name)
    file: str  # a local copy (the disk cache of the node that fetched it)
    digest: str  # sha256 of the file: the same LoRA under any source is one adapter
    scale: float = 1.0


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
    loras: tuple[LoraRef, ...] = ()  # summed, each times its scale (diffusers' set_adapters)

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
