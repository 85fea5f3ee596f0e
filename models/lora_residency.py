"""Which LoRAs a replica holds: parsed files in host memory, combined adapters in device slots.

Two tiers over one LoraBank (the disk tier below them is the server's, server/lora_sources.py):
- host: each LoRA file read once (models/lora_files.py) and kept in an LRU capped in bytes;
- device: each request's LoRA set, combined into one adapter (scales folded in), in a bank slot,
  LRU over the slots that no running request uses. A request waits here, before the engine,
  until its adapter is resident; concurrent requests for the same set load it once.
A file that cannot be used fails the request that asked for it (LoraFormatError), nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from typing import Callable, Sequence

from models.lora_files import LoraFormatError, LoraWeights, check_fits, combine, read_lora
from models.lora_layers import NO_ADAPTER, LoraBank
from models.request import LoraRef

AdapterKey = tuple[tuple[str, float], ...]  # (file digest, scale) per LoRA, in request order


def adapter_key(refs: Sequence[LoraRef]) -> AdapterKey:
    return tuple((ref.digest, ref.scale) for ref in refs)


class LoraResidency:
    def __init__(
        self,
        bank: LoraBank,
        component: str,
        shapes: dict[str, tuple[int, int]],
        host_max_bytes: int,
        locate: Callable[[LoraRef], str] = lambda ref: ref.file,
    ) -> None:
        """`locate(ref)` gives a local path of the ref's file (the caller may fetch it on this node)."""
        self.bank, self.component, self.shapes = bank, component, shapes
        self.host_max_bytes = host_max_bytes
        self.locate = locate
        self.host: OrderedDict[str, LoraWeights] = OrderedDict()
        self.device: OrderedDict[AdapterKey, int] = OrderedDict()  # key -> slot, least recently used first
        self.free_slots = [s for s in range(bank.slots) if s != NO_ADAPTER]
        self.users: Counter[int] = Counter()  # slot -> running requests that use it
        self._loading: dict[AdapterKey, asyncio.Future] = {}
        self._released = asyncio.Condition()
        self.stats: Counter[str] = Counter()  # host_hit/_miss, device_hit/_miss, loads, load_s_total

    def resident(self) -> list[AdapterKey]:
        return list(self.device)

    async def acquire(self, refs: Sequence[LoraRef]) -> int:
        """The slot holding `refs` combined, kept until `release(slot)`; NO_ADAPTER when the set adapts
        nothing of this component. Waits while every slot is in use."""
        if not refs:
            return NO_ADAPTER
        key = adapter_key(refs)
        while True:
            if (slot := self.device.get(key)) is not None:
                self.stats["device_hit"] += 1
                self.device.move_to_end(key)
                self.users[slot] += 1
                return slot
            if (loading := self._loading.get(key)) is not None:
                await asyncio.shield(loading)  # another request is loading the same set: wait for it
                continue
            future = self._loading[key] = asyncio.get_running_loop().create_future()
            try:
                slot = await self._load(key, refs)
                future.set_result(None)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters retry and see their own failure
                raise
            finally:
                del self._loading[key]
            if slot != NO_ADAPTER:
                self.users[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        if slot == NO_ADAPTER:
            return
        self.users[slot] -= 1
        if self.users[slot] <= 0:
            del self.users[slot]

            async def notify() -> None:
                async with self._released:
                    self._released.notify_all()

            try:
                asyncio.get_running_loop().create_task(notify())
            except RuntimeError:  # no event loop: a single caller (the in-process pipeline), nobody waits
                pass

    async def _load(self, key: AdapterKey, refs: Sequence[LoraRef]) -> int:
        began = time.perf_counter()
        self.stats["device_miss"] += 1
        weights = [(await asyncio.to_thread(self._host_weights, ref), ref.scale) for ref in refs]
        if not any(self.component in w.parts for w, _ in weights):
            return NO_ADAPTER
        adapter = combine(weights, self.component)
        if (rank := max(d.rank for d in adapter.values())) > self.bank.max_rank:
            raise LoraFormatError(f"the LoRAs' combined rank {rank} exceeds the {self.bank.max_rank} this "
                                  f"deployment serves")
        slot = await self._free_slot()
        try:
            await asyncio.to_thread(self.bank.write, slot, adapter)
        except BaseException:
            self.free_slots.append(slot)
            raise
        self.device[key] = slot
        self.stats["loads"] += 1
        self.stats["load_s_total"] += time.perf_counter() - began
        return slot

    def _host_weights(self, ref: LoraRef) -> LoraWeights:
        if (weights := self.host.get(ref.digest)) is not None:
            self.stats["host_hit"] += 1
            self.host.move_to_end(ref.digest)
            return weights
        self.stats["host_miss"] += 1
        try:
            weights = read_lora(self.locate(ref))
            if self.component in weights.parts:
                check_fits(weights, self.component, self.shapes)
        except LoraFormatError as exc:
            raise LoraFormatError(f"LoRA {ref.source}: {exc}") from None
        self.host[ref.digest] = weights
        while sum(w.nbytes for w in self.host.values()) > self.host_max_bytes and len(self.host) > 1:
            self.host.popitem(last=False)
        return weights

    async def _free_slot(self) -> int:
        """A slot to write: a never-used one, else the least recently used one no request holds."""
        while True:
            if self.free_slots:
                return self.free_slots.pop(0)
            for key, slot in self.device.items():
                if self.users[slot] == 0:
                    del self.device[key]
                    return slot
            async with self._released:  # every slot is in use by a running request
                await self._released.wait()
