"""A per-request step cache in the spirit of First-Block-Cache / TeaCache, usable inside a mixed batch.

Between neighbouring steps the output of FLUX's blocks changes little for most of a schedule.
The first double block is cheap (1/57 of the blocks) and its residual (output minus input on
the image tokens) tracks how much the whole stack's output will change. So every step runs the
first block for every sample, and each sample decides on its own: if its first-block residual
moved by less than `threshold` (mean absolute change relative to the residual of the last step
that ran every block), it reuses the residual the remaining 56 blocks added at that step instead
of running them. Only the samples that do not reuse run the remaining blocks, as a smaller batch.

diffusers' cache hooks keep one cache per module and decide once for the whole batch, which
would let one request's state decide for another's; here the state lives in each request's
`StepCache`, and the decision is per sample, so a sample's result does not depend on what else
shares its forward. A threshold of 0 never reuses: results then equal the uncached forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from models.lora_layers import LoraBank


@dataclass
class StepCache:
    """One request's cache: a row per sample (image) of the request.

    Everything stays on the device: decisions are applied with `torch.where` and the reuse count
    is a device tensor, read only when asked (`reused`, `computed`), so a step needs no host sync.
    """

    threshold: float
    first_residual: torch.Tensor | None = None  # (n, L, D) first block's image residual at the last full step
    rest_residual: torch.Tensor | None = None  # (n, L, D) what the remaining blocks added at that step
    sample_steps: int = 0
    reused_count: torch.Tensor | None = None  # () sample-steps that reused rest_residual, on the device

    @property
    def reused(self) -> int:
        """Sample-steps that reused rest_residual (reads the device)."""
        return 0 if self.reused_count is None else int(self.reused_count)

    @property
    def computed(self) -> int:
        """Sample-steps that ran every block."""
        return self.sample_steps - self.reused

    def reuse_mask(self, first_residual: torch.Tensor) -> torch.Tensor:
        """(n,) bool: which samples may skip the remaining blocks this step."""
        if self.first_residual is None:
            return torch.zeros(first_residual.shape[0], dtype=torch.bool, device=first_residual.device)
        return relative_change(first_residual, self.first_residual) < self.threshold

    def record(self, first_residual: torch.Tensor, rest_residual: torch.Tensor, reused: torch.Tensor) -> None:
        """Keep this step's residuals for the samples that ran every block."""
        if self.first_residual is None:
            self.first_residual, self.rest_residual = first_residual.clone(), rest_residual.clone()
        else:
            # The reference stays at the last full step, so small changes add up until they recompute.
            keep = reused.view(-1, *([1] * (first_residual.dim() - 1)))
            self.first_residual = torch.where(keep, self.first_residual, first_residual)
            self.rest_residual = torch.where(keep, self.rest_residual, rest_residual)
        count = reused.sum()
        self.reused_count = count if self.reused_count is None else self.reused_count + count
        self.sample_steps += reused.numel()


def relative_change(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per sample: mean |current - reference| / mean |reference|, in float32."""
    current, reference = current.float(), reference.float()
    dims = tuple(range(1, current.dim()))
    return (current - reference).abs().mean(dims) / reference.abs().mean(dims)


@lru_cache(maxsize=64)
def rotary_embedding(pos_embed: nn.Module, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rotary embedding of the text and image positions, computed once per resolution: the ids
    come from models/sampling.py's per-resolution caches, so the same tensors mean the same positions."""
    return pos_embed(torch.cat((txt_ids, img_ids), dim=0))


def forward_with_step_cache(
    transformer: FluxTransformer2DModel,
    caches: list[StepCache | None],
    sizes: list[int],
    *,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None,
    loras: LoraBank | None = None,
) -> torch.Tensor:
    """FluxTransformer2DModel.forward (as diffusers 0.42 runs it without ControlNet/IP-Adapter),
    split after the first block so each sample may reuse its cached remaining-blocks residual.

    `caches[i]` belongs to the `sizes[i]` consecutive samples of request i; None never reuses.
    The block lists are the module's own, so a module with compiled or fp8 blocks runs those.
    `loras`: the bank whose active batch the forward runs; the remaining blocks run its subset.
    """
    hidden = transformer.x_embedder(hidden_states)
    timestep = timestep.to(hidden.dtype) * 1000
    if guidance is None:
        temb = transformer.time_text_embed(timestep, pooled_projections)
    else:
        temb = transformer.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled_projections)
    context = transformer.context_embedder(encoder_hidden_states)
    rotary = rotary_embedding(transformer.pos_embed, txt_ids, img_ids)
    first, *rest = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    context_1, hidden_1 = first(hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary)
    first_residual = hidden_1 - hidden
    reused = torch.cat([
        cache.reuse_mask(r) if cache is not None else torch.zeros(len(r), dtype=torch.bool, device=r.device)
        for cache, r in zip(caches, first_residual.split(sizes))
    ])
    # The one host sync per step: the size of the remaining blocks' batch depends on the decisions.
    run = (~reused).nonzero().squeeze(1)
    computed = hidden_1
    if len(run):
        # Contiguous inputs: compiled blocks then see one memory layout whatever the batch.
        h, c, e = (x.index_select(0, run).contiguous() for x in (hidden_1, context_1, temb))
        with loras.subset(run) if loras is not None else contextlib.nullcontext():
            for block in rest:
                c, h = block(hidden_states=h, encoder_hidden_states=c, temb=e, image_rotary_emb=rotary)
        computed = hidden_1.index_copy(0, run, h)
    cached_rest = torch.cat([
        cache.rest_residual if cache is not None and cache.rest_residual is not None else torch.zeros_like(r)
        for cache, r in zip(caches, first_residual.split(sizes))
    ])
    final = torch.where(reused.view(-1, 1, 1), hidden_1 + cached_rest, computed)
    for cache, rows, first_rows, mask in zip(caches, (final - hidden_1).split(sizes), first_residual.split(sizes),
                                             reused.split(sizes)):
        if cache is not None:
            cache.record(first_rows, rows, mask)
    return transformer.proj_out(transformer.norm_out(final, temb))
