"""LoRA files for the tiny model in the layouts people publish, made by the tests (random weights).

- diffusers/PEFT: `transformer.<module>.lora_A.weight` / `lora_B.weight` (+ `.alpha`), and the CLIP part
  under `text_encoder.`;
- kohya (sd-scripts): `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `lora_up.weight` /
  `.alpha`, fused q/k/v split by diffusers' converter, and `lora_te1_...` for CLIP;
- XLabs/BFL: `double_blocks.0.processor.qkv_lora1.down.weight` / `up.weight`.
The shapes follow the tiny transformer (inner dim 16, MLP 64) and the tiny CLIP (hidden 32).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

D = 16  # tiny transformer inner dim
MLP = 64  # tiny single block MLP width
CLIP = 32  # tiny CLIP hidden size


def _pair(gen: torch.Generator, rank: int, fan_in: int, fan_out: int, scale: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(rank, fan_in, generator=gen) * scale
    up = torch.randn(fan_out, rank, generator=gen) * scale
    return down, up


def diffusers_lora(path: Path, seed: int, rank: int = 4, alpha: float | None = None, text_encoder: bool = False) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = {
        "transformer.transformer_blocks.0.attn.to_q": (D, D),
        "transformer.transformer_blocks.0.attn.to_v": (D, D),
        "transformer.transformer_blocks.0.attn.add_k_proj": (D, D),
        "transformer.transformer_blocks.0.ff.net.2": (4 * D, D),
        "transformer.single_transformer_blocks.0.attn.to_k": (D, D),
        "transformer.single_transformer_blocks.0.proj_mlp": (D, MLP),
        "transformer.single_transformer_blocks.0.proj_out": (D + MLP, D),
    }
    if text_encoder:
        targets |= {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (CLIP, CLIP),
                    "text_encoder.text_model.encoder.layers.0.mlp.fc2": (2 * CLIP, CLIP)}
    for module, (fan_in, fan_out) in targets.items():
        down, up = _pair(gen, rank, fan_in, fan_out)
        tensors[f"{module}.lora_A.weight"] = down
        tensors[f"{module}.lora_B.weight"] = up
        if alpha is not None:
            tensors[f"{module}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def kohya_lora(path: Path, seed: int, rank: int = 4, alpha: float = 2.0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = {
        "lora_unet_double_blocks_0_img_attn_qkv": (D, 3 * D),
        "lora_unet_double_blocks_0_txt_attn_proj": (D, D),
        "lora_unet_double_blocks_0_img_mlp_0": (D, 4 * D),
        "lora_unet_single_blocks_0_linear2": (D + MLP, D),
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": (CLIP, CLIP),
        "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": (CLIP, CLIP),
    }
    for module, (fan_in, fan_out) in targets.items():
        down, up = _pair(gen, rank, fan_in, fan_out)
        tensors[f"{module}.lora_down.weight"] = down
        tensors[f"{module}.lora_up.weight"] = up
        tensors[f"{module}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def xlabs_lora(path: Path, seed: int, rank: int = 4) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = {
        "double_blocks.0.processor.qkv_lora1": (D, 3 * D),
        "double_blocks.0.processor.proj_lora2": (D, D),
        "double_blocks.0.processor.qkv_lora2": (D, 3 * D),
    }
    for module, (fan_in, fan_out) in targets.items():
        down, up = _pair(gen, rank, fan_in, fan_out)
        tensors[f"{module}.down.weight"] = down
        tensors[f"{module}.up.weight"] = up
    save_file(tensors, str(path))
    return path


def sdxl_lora(path: Path, seed: int) -> Path:
    """An SDXL LoRA's keys: not a FLUX layout."""
    gen = torch.Generator().manual_seed(seed)
    down, up = _pair(gen, 4, 320, 320)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down,
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": up}, str(path))
    return path


def wrong_shape_lora(path: Path, seed: int) -> Path:
    """FLUX.1-dev's real shapes (3072 wide): right names, wrong shapes for the tiny model."""
    gen = torch.Generator().manual_seed(seed)
    down, up = _pair(gen, 2, 3072, 3072, scale=0.01)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up}, str(path))
    return path
