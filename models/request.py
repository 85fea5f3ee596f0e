"""What one generation asks for, in model terms (sizes already rounded and validated)."""

from __future__ import annotations

from dataclasses import dataclass

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
