"""GPU memory each stage's replica needs, from the real components' shapes (models/shapes.py) on
the meta device: parameters, the fp8 copy of the blocks, activations at the replica's largest
forward, and what requests held by a Denoiser keep on the device. No GPU is needed to plan.

Activation figures are per-token (per-pixel) counts of the tensors alive at a forward's peak,
read off the modules' forward code; each stage logs its measured peak after warm-up
(deployments/runtime.py), which is what a GPU run checks them against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from models.shapes import BUILDERS, FLUX_DEV_TRANSFORMER, T5_XXL
from models.vae import MAX_DECODE_PIXELS, TILE_ABOVE_PIXELS

GIB = 1024**3
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # per process: CUDA context, cuBLAS workspace, kernels (lazy loading)
HIDDEN = FLUX_DEV_TRANSFORMER["num_attention_heads"] * FLUX_DEV_TRANSFORMER["attention_head_dim"]  # 3072
TEXT_TOKENS = 512
MAX_IMAGES_PER_REQUEST = 4  # fal's num_images limit (api/schemas.py)
# Widths (in units of HIDDEN) alive per token at the peak of a single block in the cache-aware forward:
# input, norm, q/k/v, attention out, 4x MLP in and out (8), the 5x concat before proj_out, and the
# step cache's first-block output, residual, gathered rows and result (4).
DENOISE_WIDTHS_PER_TOKEN = 1 + 1 + 3 + 1 + 8 + 5 + 4
# VAE decoder peak per output pixel: the last up block's 128-channel resnet at full size (input,
# norm, activation, conv out) plus the 256-channel upsampled input of that block: 4*128 + 256.
VAE_CHANNELS_PER_PIXEL = 4 * 128 + 256
VAE_TILE_PIXELS = 512 * 512  # diffusers' AutoencoderKL tiles the decode in 512-pixel tiles


@lru_cache(maxsize=None)
def parameter_count(component: str) -> int:
    """Parameters and buffers of a real component, counted on the meta device (tied weights once)."""
    with torch.device("meta"):
        module = BUILDERS[component]()
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def _fp8_linears(module: nn.Module) -> tuple[int, int]:
    """(weight elements, output rows) of the Linear layers the fp8 mode quantizes in the blocks."""
    from models.acceleration import _is_fp8_linear

    elements = rows = 0
    for blocks in (module.transformer_blocks, module.single_transformer_blocks):
        for block in blocks:
            for name, child in block.named_modules():
                if name and _is_fp8_linear(child, name):
                    elements += child.weight.numel()
                    rows += child.out_features
    return elements, rows


@lru_cache(maxsize=None)
def fp8_copy_bytes(bias_itemsize: int = 2) -> int:
    """The `high` mode's copy of the blocks: fp8 weights, one fp32 scale per row, biases kept."""
    with torch.device("meta"):
        module = BUILDERS["transformer"]()
    elements, rows = _fp8_linears(module)
    return elements + 4 * rows + bias_itemsize * rows


@lru_cache(maxsize=None)
def lora_pool_bytes(component: str, slots: int, max_rank: int, itemsize: int = 2) -> int:
    """A LoRA bank's pools on a component (models/lora_layers.py): every Linear's down and up, padded
    to `max_rank`, for `slots` adapter sets plus the empty slot."""
    if slots == 0:
        return 0
    with torch.device("meta"):
        module = BUILDERS[component]()
    widths = sum(m.in_features + m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    return itemsize * widths * max_rank * (slots + 1)


@dataclass(frozen=True)
class StageMemory:
    stage: str
    parts: dict[str, int]  # what -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def denoiser_memory(
    max_batch_tokens: int, max_ongoing_requests: int, modes: list[str], max_pixels: int, itemsize: int = 2,
    lora_slots: int = 0, lora_max_rank: int = 0,
) -> StageMemory:
    """The transformer, the fp8 copy when `high` is built, one forward of `max_batch_tokens`, every
    request it may hold at its largest (latents, prompt embeddings, step-cache residuals), and the
    LoRA pools of `lora_slots` sets at `lora_max_rank`."""
    image_tokens = max_pixels // 256  # 8x VAE, 2x2 packing
    samples = max_ongoing_requests * MAX_IMAGES_PER_REQUEST
    cached = any(m != "none" for m in modes)
    per_sample = itemsize * (image_tokens * 64 + TEXT_TOKENS * T5_XXL["d_model"])
    if cached:
        per_sample += 2 * itemsize * image_tokens * HIDDEN  # first-block and remaining-blocks residuals
    parts = {
        "weights": itemsize * parameter_count("transformer"),
        "activations": itemsize * max_batch_tokens * HIDDEN * DENOISE_WIDTHS_PER_TOKEN,
        "held requests": samples * per_sample,
        "cuda context": CUDA_CONTEXT_BYTES,
        "LoRA pools": lora_pool_bytes("transformer", lora_slots, lora_max_rank, itemsize),
    }
    if "high" in modes:
        parts["fp8 blocks"] = fp8_copy_bytes(itemsize)
    return StageMemory("Denoiser", parts)


def text_encoder_memory(batch_size: int, itemsize: int = 2, lora_slots: int = 0, lora_max_rank: int = 0
                        ) -> StageMemory:
    """CLIP-L and T5-XXL, and T5's largest layer for `batch_size` prompts of 512 tokens: hidden
    states, gated FFN (3 x d_ff) and float32 attention scores before and after softmax."""
    d, ff, heads = T5_XXL["d_model"], T5_XXL["d_ff"], T5_XXL["num_heads"]
    per_token = itemsize * (4 * d + 3 * ff) + 2 * 4 * heads * TEXT_TOKENS
    return StageMemory("TextEncoder", {
        "weights": itemsize * (parameter_count("text_encoder") + parameter_count("text_encoder_2")),
        "activations": batch_size * TEXT_TOKENS * per_token,
        "cuda context": CUDA_CONTEXT_BYTES,
        "LoRA pools": lora_pool_bytes("text_encoder", lora_slots, lora_max_rank, itemsize),
    })


def decoder_memory(itemsize: int = 2) -> StageMemory:
    """VAE and safety checker, and one VAE decode at its cap (models/vae.py): at most
    MAX_DECODE_PIXELS per call untiled, one tile at a time above TILE_ABOVE_PIXELS."""
    untiled = max(MAX_DECODE_PIXELS, TILE_ABOVE_PIXELS)
    return StageMemory("Decoder", {
        "weights": itemsize * (parameter_count("vae") + parameter_count("safety_checker")),
        "activations": itemsize * VAE_CHANNELS_PER_PIXEL * max(untiled, VAE_TILE_PIXELS),
        "cuda context": CUDA_CONTEXT_BYTES,
    })
