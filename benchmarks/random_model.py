"""Random weights of the exact FLUX.1-dev shapes (transformer, T5-XXL, CLIP-L, VAE) for speed runs.

Modules are built on the meta device (no memory, no init cost), cast, then materialised on the
target device and filled with small random values there. Speed does not depend on weight values;
the images are noise. `write_random_folder` saves them in the diffusers layout the Serve app
loads (tokenizers and scheduler taken from the tiny preset: character-level, but their ids fit).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from models.shapes import CLIP_L, FLUX_DEV_TRANSFORMER, FLUX_VAE, T5_XXL

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def random_module(build: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """`build()` on the meta device, materialised on `device` in `dtype` with N(0, 0.02) weights.

    Norm scales are 1 and biases 0, so activations stay in a sane range through 57 blocks.
    Non-persistent buffers (e.g. CLIP's position ids) are not saved, so loaders rebuild them.
    """
    with torch.device("meta"):
        module = build()
    module = module.to(dtype).to_empty(device=device).eval()
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return module


def write_random_folder(
    target: Path, tiny_folder: Path, device: torch.device, dtype: torch.dtype, parts: tuple[str, ...] = COMPONENTS
) -> Path:
    """A FLUX.1-dev-shaped model folder with random weights for `parts` (~34 GB in bf16 for all of
    them); reused when a previous call completed it."""
    target = Path(target)
    marker = target / f"random_{'+'.join(parts)}.done"
    if marker.exists():
        return target
    for part in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(tiny_folder / part, target / part, dirs_exist_ok=True)
    shutil.copy(tiny_folder / "model_index.json", target / "model_index.json")
    builders = {
        "transformer": lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
        "vae": lambda: AutoencoderKL(**FLUX_VAE),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(tiny_folder / "text_encoder", **CLIP_L)),
        "text_encoder_2": lambda: T5EncoderModel(T5Config.from_pretrained(tiny_folder / "text_encoder_2", **T5_XXL)),
    }
    for part in parts:  # one component in memory at a time
        module = random_module(builders[part], device, dtype)
        module.to("cpu").save_pretrained(target / part, safe_serialization=True)
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    marker.write_text("complete\n")
    return target
