"""Unmerged LoRAs in a batched forward: every sample may carry its own adapter, or none.

A `LoraBank` attaches to a module (the transformer, or CLIP) once, before any compile or fp8 copy:
each Linear gets a forward hook and a pool of `slots` device-resident adapters padded to
`max_rank`, `down` (slots, in, R) and `up` (slots, R, out). The base weights are never changed.
Before a forward the caller says which slot each sample uses (`LoraBank.active`); every Linear
then adds `x @ down[slot] @ up[slot]` per sample, one gathered batched matmul whatever the mix of
adapters. Slot 0 is all zeros: a sample without an adapter in a mixed forward adds nothing (it
pays the padded low-rank product, ~2 * rank * (in + out) FLOPs per token, about 3% of a FLUX
block's Linears at rank 64), and a forward in which no sample has an adapter runs the module's own path,
unchanged.

For torch.compile the adapters are tensors of a fixed shape (slot contents change in place, the
rank is padded) and the per-forward choice is one index tensor, batch-sized, read from the bank:
changing adapters, scales and ranks never changes a graph; a compiled block has at most a graph
with adapters and one without per batch-size class.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from models.lora_files import LowRank

NO_ADAPTER = 0  # slot 0 stays zeros: samples without an adapter add nothing


class _Site:
    """One Linear's adapter pools."""

    def __init__(self, linear: nn.Linear, slots: int, max_rank: int) -> None:
        weight = linear.weight
        dtype = weight.dtype if weight.is_floating_point() and weight.element_size() >= 2 else torch.bfloat16
        self.down = torch.zeros(slots, linear.in_features, max_rank, device=weight.device, dtype=dtype)
        self.up = torch.zeros(slots, max_rank, linear.out_features, device=weight.device, dtype=dtype)


class LoraBank:
    """Per-Linear adapter pools over `module` and the batch's current choice of adapters."""

    def __init__(self, module: nn.Module, slots: int, max_rank: int) -> None:
        if slots < 1 or max_rank < 1:
            raise ValueError("a LoRA bank needs at least one slot and rank 1")
        self.slots, self.max_rank = slots, max_rank
        self.sites: dict[str, _Site] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.index: torch.Tensor | None = None  # (batch,) each sample's slot; None: no sample has one
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}  # device copies, made once per slot tuple
        for name, linear in module.named_modules():
            if isinstance(linear, nn.Linear):
                site = _Site(linear, slots, max_rank)
                self.sites[name] = site
                self._hooks.append(linear.register_forward_hook(self._hook(site)))

    def detach(self) -> None:
        """Take the bank's hooks off its module (the module then runs as if it never had one)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _hook(self, site: _Site):
        # A closure, not a bound method: deep copies of the module (fp8 blocks) then share the bank.
        bank = self

        def add_adapters(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            index = bank.index
            if index is None:
                return None
            x = args[0]
            batch, width = x.shape[0], x.shape[-1]
            down = torch.bmm(x.reshape(batch, -1, width).to(site.down.dtype), site.down[index])
            flat = output.reshape(batch, -1, output.shape[-1])
            # One fused pass over the output: base + (x @ down) @ up.
            return torch.baddbmm(flat, down.to(flat.dtype), site.up[index].to(flat.dtype)).reshape(output.shape)

        return add_adapters

    def write(self, slot: int, adapter: dict[str, LowRank]) -> None:
        """Put a (combined) adapter into `slot`; Linears it does not adapt get zeros there."""
        if unknown := adapter.keys() - self.sites.keys():
            raise ValueError(f"adapter for modules outside this bank: {sorted(unknown)[:4]}")
        for name, site in self.sites.items():
            site.down[slot].zero_()
            site.up[slot].zero_()
            if (delta := adapter.get(name)) is not None:
                if delta.rank > self.max_rank:
                    raise ValueError(f"adapter rank {delta.rank} exceeds the bank's {self.max_rank}")
                site.down[slot, :, : delta.rank].copy_(delta.down.T, non_blocking=True)
                site.up[slot, : delta.rank].copy_(delta.up.T, non_blocking=True)

    def _device_index(self, slots: tuple[int, ...]) -> torch.Tensor:
        index = self._indices.get(slots)
        if index is None:
            device = next(iter(self.sites.values())).down.device
            index = self._indices[slots] = torch.tensor(slots, dtype=torch.long, device=device)
            if len(self._indices) > 256:  # bounded: the slot tuples a replica sees are few
                self._indices.pop(next(iter(self._indices)))
        return index

    @contextlib.contextmanager
    def active(self, slots: Sequence[int]) -> Iterator[None]:
        """During the block: sample i of each forward uses `slots[i]` (NO_ADAPTER: none). A batch in
        which no sample has an adapter runs the module's own path."""
        saved = self.index
        self._set(tuple(slots))
        try:
            yield
        finally:
            self.index = saved

    @contextlib.contextmanager
    def subset(self, rows: torch.Tensor) -> Iterator[None]:
        """During the block: the forward runs only these rows (a device index) of the active batch, as
        the step cache does; the slot index follows on the device, with no host sync."""
        saved = self.index
        if self.index is not None:
            self.index = self.index.index_select(0, rows)
        try:
            yield
        finally:
            self.index = saved

    def _set(self, slots: tuple[int, ...]) -> None:
        self.index = self._device_index(slots) if any(s != NO_ADAPTER for s in slots) else None
