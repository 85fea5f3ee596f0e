"""Black Forest Labs' transformer checkpoint layout (their `flux` repository; ComfyUI prefixes every
key with `model.diffusion_model.`) read into diffusers' parameter names, one tensor at a time.

diffusers' own converter (`convert_flux_transformer_checkpoint_to_diffusers`, 0.42.1) needs the whole
state dict in memory at once and hardcodes FLUX's width (3072) and MLP ratio, so it cannot stream and
cannot load any other width (the tiny preset's): here the sizes come from the model being filled.
"""

from __future__ import annotations

import torch

COMFYUI_PREFIX = "model.diffusion_model."

# BFL module -> diffusers module(s); several targets are stacked along dim 0 in this order.
_TOP: dict[str, str | tuple[str, ...]] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # halves swapped (see _SWAPPED)
}
_DOUBLE: dict[str, str | tuple[str, ...]] = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_SINGLE: dict[str, str | tuple[str, ...]] = {
    "modulation.lin": "norm.linear",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # q, k, v: inner_dim rows each; the MLP: the rest
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "linear2": "proj_out",
}
# BFL's final modulation yields (shift, scale), diffusers' AdaLayerNormContinuous reads (scale, shift).
_SWAPPED = "final_layer.adaLN_modulation.1."


def is_bfl_layout(keys: list[str]) -> bool:
    return any(k.removeprefix(COMFYUI_PREFIX).startswith("double_blocks.") for k in keys)


def diffusers_names(key: str) -> tuple[str, ...]:
    """The diffusers parameter(s) BFL's `key` holds, in stacking order; `(key,)` for a key BFL's layout lacks."""
    module, _, param = key.rpartition(".")
    param = "weight" if param == "scale" else param  # RMSNorm's scale
    match module.split(".", 2):
        case ["double_blocks", index, rest]:
            table, prefix, name = _DOUBLE, f"transformer_blocks.{index}.", rest
        case ["single_blocks", index, rest]:
            table, prefix, name = _SINGLE, f"single_transformer_blocks.{index}.", rest
        case _:
            table, prefix, name = _TOP, "", module
    target = table.get(name)
    if target is None:
        return (key,)
    return tuple(f"{prefix}{t}.{param}" for t in ((target,) if isinstance(target, str) else target))


def diffusers_parts(key: str, tensor: torch.Tensor, inner_dim: int) -> tuple[torch.Tensor, ...]:
    """`tensor` (BFL's `key`) cut into the parameters `diffusers_names(key)` names (views where possible)."""
    count = len(diffusers_names(key))
    if count == 3:
        return tensor.chunk(3)
    if count == 4:
        return tensor.split([inner_dim] * 3 + [len(tensor) - 3 * inner_dim])
    if key.startswith(_SWAPPED):
        shift, scale = tensor.chunk(2)
        return (torch.cat([scale, shift]),)
    return (tensor,)
