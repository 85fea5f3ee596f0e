"""A replica's LoRAs: the bank on its module, the host and device tiers, sized by the settings.

Files come from the node's disk cache (server/lora_sources.py); a request routed to a node that
lacks the file fetches it there from the same source, and its identity (sha256) must match.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Sequence

from torch import nn

from deployments.metrics import LoraMetrics
from models.lora_files import LoraFormatError, linear_shapes
from models.lora_layers import NO_ADAPTER, LoraBank
from models.lora_residency import LoraResidency
from models.request import LoraRef
from server.errors import ServiceError
from server.lora_sources import LoraSources
from settings import Settings


class ReplicaLoras:
    def __init__(self, module: nn.Module, component: str, stage: str, settings: Settings) -> None:
        """Attach to `module` before any copy or compile of it (they share the bank)."""
        self.sources = LoraSources(settings)
        self.bank = LoraBank(module, slots=settings.lora_device_slots + 1, max_rank=settings.lora_max_rank)
        self.residency = LoraResidency(self.bank, component, linear_shapes(module), settings.lora_host_cache_bytes,
                                       locate=self._locate)
        self.metrics = LoraMetrics(stage)

    def _locate(self, ref: LoraRef) -> str:
        """The ref's file on this node (called in a worker thread)."""
        if Path(ref.file).is_file():
            return ref.file
        try:
            file = asyncio.run(self.sources.local_file(ref.source))
        except ServiceError as exc:
            raise LoraFormatError(str(exc)) from None
        if self.sources.digest(file) != ref.digest:
            raise LoraFormatError(f"LoRA {ref.source}: its content changed since the request was accepted")
        return str(file)

    async def acquire(self, refs: Sequence[LoraRef]) -> int:
        """The bank slot of `refs` (NO_ADAPTER for none); hold it until `release`."""
        if not refs:
            return NO_ADAPTER
        try:
            return await self.residency.acquire(refs)
        finally:
            self.metrics.update(self.residency.stats, len(self.residency.device))

    def release(self, slot: int) -> None:
        self.residency.release(slot)

    def stats(self) -> dict:
        return {"events": dict(self.residency.stats), "resident": [[list(p) for p in key] for key in
                                                                  self.residency.resident()]}
