"""SRPO's single-file transformer checkpoint: streaming load into the serving dtype, and bf16 conversion.

SRPO ships one 47.6 GB fp32 safetensors with diffusers key names. Loading it the usual way holds
the whole fp32 state dict next to the model; here each tensor is read (memory-mapped), cast and
placed one at a time, so memory peaks at the model in its serving dtype plus one tensor.

Many copies are published in BFL's own layout (`double_blocks.0.img_attn.qkv.weight`, ComfyUI adds
`model.diffusion_model.`): those are read the same way, each tensor renamed and split into
diffusers' parameters as read (models/bfl_layout.py). Files stored in fp8 are refused: upcasting them
would serve fp8-quality weights as if they were the bf16 model (acceleration `high` makes its own
fp8 copy with per-row scales from bf16 weights).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open

from models.bfl_layout import COMFYUI_PREFIX, diffusers_names, diffusers_parts, is_bfl_layout

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_FP8_CODES = {"F8_E4M3", "F8_E5M2", "F8_E4M3FN", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}


def _sources(keys: list[str]) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """Each tensor of the file to read: (its BFL name or None in diffusers' layout, the parameters it fills)."""
    if not is_bfl_layout(keys):
        return {key: (None, (key,)) for key in keys}
    # ComfyUI's all-in-one files carry the VAE and text encoders beside `model.diffusion_model.`
    prefixed = [k for k in keys if k.startswith(COMFYUI_PREFIX)]
    bfl = {key: key.removeprefix(COMFYUI_PREFIX) for key in prefixed or keys}
    return {key: (name, diffusers_names(name)) for key, name in bfl.items()}


def load_transformer_file(
    config_dir: Path, weights: Path, device: torch.device, dtype: torch.dtype
) -> FluxTransformer2DModel:
    """Build the transformer from `config_dir`'s config on the meta device and fill it from `weights`."""
    config = FluxTransformer2DModel.load_config(config_dir)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    expected = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        if fp8 := sorted({f.get_slice(k).get_dtype() for k in keys} & _FP8_CODES):
            raise ValueError(
                f"{weights} stores its weights in fp8 ({', '.join(fp8)}); refused: serve a bf16 or fp32 file "
                "(acceleration 'high' builds its own fp8 copy with per-row scales)"
            )
        sources = _sources(keys)
        found = {name for _, names in sources.values() for name in names}
        if found != expected:
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            raise ValueError(
                f"{weights} does not match the transformer config: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        for key, (bfl, names) in sources.items():  # one file tensor in memory at a time, cast as read
            if bfl is None:
                state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
                continue
            parts = diffusers_parts(bfl, f.get_tensor(key).to(dtype), model.inner_dim)
            for name, part in zip(names, parts):
                # copy: a part that is a view would keep its fused sibling's storage alive and shared
                state[name] = part.to(device, copy=len(parts) > 1)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def convert_transformer_file(source: Path, target: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `source` cast to `dtype` as a new safetensors file, one tensor in memory at a time.

    safetensors' own writer needs the whole state dict at once (24 GB for SRPO in bf16), so the
    file is written directly: an 8-byte header length, the JSON header, then the tensors' bytes.
    """
    code = _SAFETENSORS_DTYPES[dtype]
    with safe_open(str(source), framework="pt", device="cpu") as f:
        keys = sorted(f.keys())
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key in keys:
            shape = list(f.get_slice(key).get_shape())
            size = dtype.itemsize * int(torch.Size(shape).numel())
            header[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format asks for 8-byte alignment of the data
        tmp = Path(str(target) + ".partial")
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for key in keys:
                out.write(f.get_tensor(key).to(dtype).reshape(-1).view(torch.uint8).numpy().tobytes())
        tmp.replace(target)
    return Path(target)
