"""Which attention kernel the transformer runs, chosen deliberately rather than left to the build.

`auto` takes PyTorch SDPA's flash kernel on a GPU in bf16/fp16 (exact attention; cuDNN's SDPA
kernel is left out: SGLang's diffusion server disables it after crashes) and PyTorch's dispatching
SDPA elsewhere. Any of diffusers' backend names may be set explicitly (SRPO_ATTENTION_BACKEND).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.modeling_utils import ModelMixin

BACKENDS = ("auto", *(b.value for b in AttentionBackendName))


def choose_attention_backend(setting: str, device: torch.device, dtype: torch.dtype) -> str:
    if setting not in BACKENDS:
        raise ValueError(f"unknown attention backend {setting!r}; known: {', '.join(BACKENDS)}")
    if setting != "auto":
        return setting
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return AttentionBackendName._NATIVE_FLASH.value
    return AttentionBackendName.NATIVE.value


def set_attention_backend(module: ModelMixin, setting: str) -> str:
    """Set the backend `setting` resolves to on every attention layer of `module`; return its name."""
    backend = choose_attention_backend(setting, module.device, module.dtype)
    module.set_attention_backend(backend)
    return backend
