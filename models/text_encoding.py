"""Prompt encoding (CLIP pooled + T5 sequence) through FluxPipeline.encode_prompt itself."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline

from models.loading import load_text_encoders
from models.lora_layers import LoraBank

T5_MAX_LENGTH = 512


@dataclass
class PromptEmbedding:
    prompt_embeds: torch.Tensor  # (512, joint_attention_dim): T5 sequence
    pooled: torch.Tensor  # (pooled_projection_dim,): CLIP pooled output


class PromptEncoder:
    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        clip_tok, clip, t5_tok, t5 = load_text_encoders(folder, device, dtype)
        self.device = device
        # A pipeline holding only the text parts: encode_prompt is then diffusers' code, unchanged.
        self._pipe = FluxPipeline(
            scheduler=None,
            vae=None,
            text_encoder=clip,
            tokenizer=clip_tok,
            text_encoder_2=t5,
            tokenizer_2=t5_tok,
            transformer=None,
        )

    @property
    def clip(self) -> torch.nn.Module:
        """The CLIP text model: what a FLUX LoRA's text-encoder part adapts (never T5)."""
        return self._pipe.text_encoder

    @torch.no_grad()
    def encode(self, prompts: list[str], loras: LoraBank | None = None,
               adapters: list[int] | None = None) -> list[PromptEmbedding]:
        """Encode a batch of prompts in one forward per encoder; with `loras` (the bank on `clip`),
        prompt i runs CLIP with adapter slot `adapters[i]`."""
        with loras.active(adapters or []) if loras is not None else contextlib.nullcontext():
            embeds, pooled, _ = self._pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=T5_MAX_LENGTH
            )
        return [PromptEmbedding(e, p) for e, p in zip(embeds, pooled)]
