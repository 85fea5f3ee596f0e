"""TextEncoder stage: CLIP pooled + T5 embeddings, batched, with an LRU cache of prompts."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from ray import serve

from deployments.runtime import ReplicaHealth, StageRuntime
from models.text_encoding import PromptEmbedding, PromptEncoder


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
class TextEncoder(ReplicaHealth):
    def __init__(self, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, cache_size: int = 512) -> None:
        self.runtime = StageRuntime("text_encoder")
        self.encoder = PromptEncoder(self.runtime.paths.model_dir, self.runtime.device, self.runtime.dtype)
        self.encoder.encode(["warm-up"])  # first forward allocates; do it before reporting ready
        self.runtime.log_peak_memory()
        self.cache: OrderedDict[str, PromptEmbedding] = OrderedDict()
        self.cache_size = cache_size
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode(self, prompts: list[str]) -> list[PromptEmbedding]:
        self.runtime.record_batch(len(prompts))
        misses = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        with self.runtime.metrics.timed(len(prompts)):
            if misses:
                embeds = await asyncio.to_thread(self._encode_to_cpu, misses)
                self.cache.update(zip(misses, embeds))
        results = []
        for prompt in prompts:
            self.cache.move_to_end(prompt)
            results.append(self.cache[prompt])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return results

    def _encode_to_cpu(self, prompts: list[str]) -> list[PromptEmbedding]:
        return [PromptEmbedding(e.prompt_embeds.cpu(), e.pooled.cpu()) for e in self.encoder.encode(prompts)]

    def stats(self) -> dict:
        return {"batch_sizes": dict(self.runtime.batch_sizes), "cached_prompts": len(self.cache)}
