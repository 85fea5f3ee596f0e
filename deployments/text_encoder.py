"""TextEncoder stage: CLIP pooled + T5 embeddings, batched, with an LRU cache of prompts.

A request's LoRAs may adapt CLIP (a LoRA file's text-encoder part): prompts with different LoRA
sets still share one batch, each running CLIP with its own adapter (models/lora_layers.py).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from ray import serve

from deployments.lora_runtime import ReplicaLoras
from deployments.runtime import ReplicaHealth, StageRuntime
from models.lora_files import LoraFormatError
from models.lora_residency import AdapterKey, adapter_key
from models.request import LoraRef
from models.text_encoding import PromptEmbedding, PromptEncoder

CacheKey = tuple[str, AdapterKey]


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
class TextEncoder(ReplicaHealth):
    def __init__(self, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, cache_size: int = 512) -> None:
        self.runtime = StageRuntime("text_encoder")
        self.encoder = PromptEncoder(self.runtime.paths.model_dir, self.runtime.device, self.runtime.dtype)
        self.loras = ReplicaLoras(self.encoder.clip, "text_encoder", "text_encoder", self.runtime.settings)
        self.encoder.encode(["warm-up"])  # first forward allocates; do it before reporting ready
        self.runtime.log_peak_memory()
        self.cache: OrderedDict[CacheKey, PromptEmbedding] = OrderedDict()
        self.cache_size = cache_size
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def encode(self, prompt: str, loras: tuple[LoraRef, ...] = ()) -> PromptEmbedding:
        """The prompt's embedding under its request's LoRAs (batched with other calls)."""
        result = await self._encode_batch(prompt, loras)
        if isinstance(result, Exception):  # this request's LoRA failed; the rest of its batch did not
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, prompts: list[str], loras: list[tuple[LoraRef, ...]]
                            ) -> list[PromptEmbedding | Exception]:
        self.runtime.record_batch(len(prompts))
        keys = [(prompt, adapter_key(refs)) for prompt, refs in zip(prompts, loras)]
        misses = {key: refs for key, refs in zip(keys, loras) if key not in self.cache}
        failed: dict[CacheKey, Exception] = {}
        with self.runtime.metrics.timed(len(prompts)):
            if misses:
                self.cache.update(await self._encode_to_cpu(misses, failed))
        results: list[PromptEmbedding | Exception] = []
        for key in keys:
            if key in failed:
                results.append(failed[key])
                continue
            self.cache.move_to_end(key)
            results.append(self.cache[key])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return results

    async def _encode_to_cpu(self, misses: dict[CacheKey, tuple[LoraRef, ...]],
                             failed: dict[CacheKey, Exception]) -> dict[CacheKey, PromptEmbedding]:
        """Embeddings of the keys whose LoRAs could be made resident; the others' errors in `failed`."""
        slots: dict[CacheKey, int] = {}
        try:
            for key, refs in misses.items():
                try:
                    slots[key] = await self.loras.acquire(refs)
                except LoraFormatError as exc:
                    failed[key] = exc
            if not slots:
                return {}
            encoded = await asyncio.to_thread(self.encoder.encode, [p for p, _ in slots], self.loras.bank,
                                              list(slots.values()))
        finally:
            for slot in slots.values():
                self.loras.release(slot)
        return {key: PromptEmbedding(e.prompt_embeds.cpu(), e.pooled.cpu()) for key, e in zip(slots, encoded)}

    def stats(self) -> dict:
        return {"batch_sizes": dict(self.runtime.batch_sizes), "cached_prompts": len(self.cache),
                "loras": self.loras.stats()}
