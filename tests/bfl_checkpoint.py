"""Black Forest Labs' transformer checkpoint layout, for tests of the loader that reads it."""

from __future__ import annotations

import torch


def bfl_checkpoint(state: dict[str, torch.Tensor], double: int, single: int) -> dict[str, torch.Tensor]:
    """`state` (diffusers' names) in Black Forest Labs' layout, written from their `flux` repository's
    modules (model.py, modules/layers.py), not from the loader's map. diffusers' converter checks it at
    FLUX's width; it cannot read any other width (0.42.1 hardcodes 3072), the tiny model's included."""
    bfl, used = {}, set()

    def put(bfl_module: str, *modules: str, swap: bool = False):
        for param in ("weight", "bias"):  # fused layers stack their parts along the output dimension
            names = [f"{m}.{param}" for m in modules]
            used.update(names)
            fused = torch.cat([state[n] for n in names])
            if swap:  # LastLayer: `shift, scale = adaLN_modulation(c).chunk(2)`; diffusers: scale, shift
                scale, shift = fused.chunk(2)
                fused = torch.cat([shift, scale])
            bfl[f"{bfl_module}.{param}"] = fused

    def rms_norm(bfl_module: str, module: str):  # QKNorm's RMSNorms keep their weight as `scale`
        used.add(f"{module}.weight")
        bfl[f"{bfl_module}.scale"] = state[f"{module}.weight"]

    put("img_in", "x_embedder")
    put("txt_in", "context_embedder")
    for embedder, ours in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance")):
        put(f"{embedder}.in_layer", f"time_text_embed.{ours}_embedder.linear_1")
        put(f"{embedder}.out_layer", f"time_text_embed.{ours}_embedder.linear_2")
    for i in range(double):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        for stream, norm, q, k, v, out, ff, norm_q, norm_k in (
            ("img", "norm1", "to_q", "to_k", "to_v", "to_out.0", "ff", "norm_q", "norm_k"),
            ("txt", "norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context",
             "norm_added_q", "norm_added_k"),
        ):
            put(f"{b}.{stream}_mod.lin", f"transformer_blocks.{i}.{norm}.linear")
            put(f"{b}.{stream}_attn.qkv", f"{d}.{q}", f"{d}.{k}", f"{d}.{v}")
            rms_norm(f"{b}.{stream}_attn.norm.query_norm", f"{d}.{norm_q}")
            rms_norm(f"{b}.{stream}_attn.norm.key_norm", f"{d}.{norm_k}")
            put(f"{b}.{stream}_attn.proj", f"{d}.{out}")
            put(f"{b}.{stream}_mlp.0", f"transformer_blocks.{i}.{ff}.net.0.proj")
            put(f"{b}.{stream}_mlp.2", f"transformer_blocks.{i}.{ff}.net.2")
    for i in range(single):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        put(f"{b}.modulation.lin", f"{d}.norm.linear")
        put(f"{b}.linear1", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")
        rms_norm(f"{b}.norm.query_norm", f"{d}.attn.norm_q")
        rms_norm(f"{b}.norm.key_norm", f"{d}.attn.norm_k")
        put(f"{b}.linear2", f"{d}.proj_out")
    put("final_layer.linear", "proj_out")
    put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    assert used == set(state), sorted(set(state) - used)  # the test's map covers every parameter
    return bfl
