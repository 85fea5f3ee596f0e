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

import torch
from diffusers import FluxTransformer2DModel

from models.lora_layers import LoraBank


@dataclass
class StepCache:
    """One request's cache: a row per sample (image) of the request."""

    threshold: float
    first_residual: torch.Tensor | None = None  # (n, L, D) first block's image residual at the last full step
    rest_residual: torch.Tensor | None = None  # (n, L, D) what the remaining blocks added at that step
    computed: int = 0  # sample-steps that ran every block
    reused: int = 0  # sample-steps that reused rest_residual

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
            computed = ~reused
            self.first_residual[computed] = first_residual[computed]
            self.rest_residual[computed] = rest_residual[computed]
        skipped = int(reused.sum())
        self.reused += skipped
        self.computed += reused.numel() - skipped


def relative_change(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per sample: mean |current - reference| / mean |reference|, in float32."""
    current, reference = current.float(), reference.float()
    dims = tuple(range(1, current.dim()))
    return (current - reference).abs().mean(dims) / reference.abs().mean(dims)


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
    rotary = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    first, *rest = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    context_1, hidden_1 = first(hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary)
    first_residual = hidden_1 - hidden
    reused = torch.cat([
        cache.reuse_mask(r) if cache is not None else torch.zeros(len(r), dtype=torch.bool, device=r.device)
        for cache, r in zip(caches, first_residual.split(sizes))
    ])
    # One host sync per step: the size of the remaining blocks' batch depends on the decisions.
    run_rows = [i for i, skip in enumerate(reused.tolist()) if not skip]
    run = torch.tensor(run_rows, dtype=torch.long)
    final = torch.empty_like(hidden_1)
    if len(run):
        run = run.to(hidden.device)
        h, c, e = hidden_1[run], context_1[run], temb[run]
        with loras.subset(run_rows) if loras is not None else contextlib.nullcontext():
            for block in rest:
                c, h = block(hidden_states=h, encoder_hidden_states=c, temb=e, image_rotary_emb=rotary)
        final[run] = h

    start = 0
    for cache, n in zip(caches, sizes):
        rows = slice(start, start + n)
        start += n
        if cache is None:
            continue
        mask = reused[rows]
        if cache.rest_residual is not None:
            final[rows][mask] = hidden_1[rows][mask] + cache.rest_residual[mask]
        cache.record(first_residual[rows], final[rows] - hidden_1[rows], mask)
    return transformer.proj_out(transformer.norm_out(final, temb))
