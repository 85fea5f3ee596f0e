"""The CLIP-based image safety checker (diffusers' StableDiffusionSafetyChecker layout).

A flagged image is replaced by an all-black image of the same size; the request still succeeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPImageProcessorPil


def check_safety_folder(folder: Path) -> None:
    """Raise FileNotFoundError naming everything the checker needs that `folder` lacks."""
    folder = Path(folder)
    missing = [n for n in ("config.json", "preprocessor_config.json") if not (folder / n).exists()]
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("*.safetensors")
    if missing:
        raise FileNotFoundError(f"safety checker folder {folder} lacks {', '.join(missing)}")


class SafetyChecker:
    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        folder = Path(folder)
        check_safety_folder(folder)
        self.device, self.dtype = device, dtype
        self.model = StableDiffusionSafetyChecker.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        self.model.to(device).eval()
        self.processor = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[bool]]:
        """Check uint8 HxWx3 images; return them with flagged ones blacked out, and the flags."""
        if not images:
            return [], []
        clip_input = self.processor(images=images, return_tensors="pt").pixel_values
        _, flags = self.model(clip_input=clip_input.to(self.device, self.dtype), images=[np.zeros(1)] * len(images))
        flags = [bool(f) for f in flags]
        return [np.zeros_like(img) if f else img for img, f in zip(images, flags)], flags
