"""SRPO's single-file transformer checkpoint: streaming load into the serving dtype, and bf16 conversion.

SRPO ships one 47.6 GB fp32 safetensors with diffusers key names. Loading it the usual way holds
the whole fp32 state dict next to the model; here each tensor is read (memory-mapped), cast and
placed one at a time, so memory peaks at the model in its serving dtype plus one tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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
        found = set(f.keys())
        if found != expected:
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            raise ValueError(
                f"{weights} does not match the transformer config: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        for key in f.keys():
            state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
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
