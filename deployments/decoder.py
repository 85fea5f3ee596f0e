"""Decoder stage: VAE decode + safety checker (batched), and VAE encode for image-to-image."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from ray import serve

from deployments.metrics import SafetyMetrics
from deployments.runtime import ReplicaHealth, StageRuntime
from models.vae import VaeCodec
from safety.checker import SafetyChecker


@dataclass
class DecodeJob:
    latents: torch.Tensor  # packed (n, L, 64)
    height: int
    width: int
    enable_safety_checker: bool


@dataclass
class Decoded:
    images: list[np.ndarray]
    has_nsfw_concepts: list[bool]


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
class Decoder(ReplicaHealth):
    def __init__(self, max_batch_size: int = 4, batch_wait_timeout_s: float = 0.01) -> None:
        self.runtime = StageRuntime("decoder")
        paths = self.runtime.paths
        self.vae = VaeCodec(paths.model_dir, self.runtime.device, self.runtime.dtype)
        self.safety = SafetyChecker(paths.safety_dir, self.runtime.device, self.runtime.dtype)
        self.safety_metrics = SafetyMetrics()
        self.decode.set_max_batch_size(max_batch_size)
        self.decode.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._decode_batch([DecodeJob(torch.zeros(1, 256, 64), 256, 256, True)])  # warm-up
        self.runtime.log_peak_memory()

    async def encode_image(
        self, image: Image.Image, height: int, width: int, seed: int, num_images: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def encode() -> tuple[torch.Tensor, torch.Tensor]:
            latents, noise = self.vae.encode_with_noise(image, height, width, seed, num_images)
            return latents.cpu(), noise.cpu()

        return await asyncio.to_thread(encode)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def decode(
        self,
        latents: list[torch.Tensor],
        height: list[int],
        width: list[int],
        enable_safety_checker: list[bool],
    ) -> list[Decoded]:
        """Packed latents of one request (n, L, 64) to its n images and safety flags."""
        jobs = [DecodeJob(*job) for job in zip(latents, height, width, enable_safety_checker)]
        self.runtime.record_batch(len(jobs))
        with self.runtime.metrics.timed(len(jobs)):
            decoded = await asyncio.to_thread(self._decode_batch, jobs)
        self.safety_metrics.flagged(sum(sum(d.has_nsfw_concepts) for d in decoded))
        return decoded

    def _decode_batch(self, jobs: list[DecodeJob]) -> list[Decoded]:
        # One VAE forward per resolution, one safety forward for every image that asks for it.
        images: list[list[np.ndarray]] = [[] for _ in jobs]
        for size in dict.fromkeys((j.height, j.width) for j in jobs):
            group = [i for i, j in enumerate(jobs) if (j.height, j.width) == size]
            decoded = self.vae.decode(torch.cat([jobs[i].latents for i in group]), *size)
            for i in group:
                images[i], decoded = decoded[: jobs[i].latents.shape[0]], decoded[jobs[i].latents.shape[0] :]
        checked = [(i, k) for i, j in enumerate(jobs) if j.enable_safety_checker for k in range(len(images[i]))]
        flags = [[False] * len(imgs) for imgs in images]
        if checked:
            safe, found = self.safety([images[i][k] for i, k in checked])
            for (i, k), img, flag in zip(checked, safe, found):
                images[i][k], flags[i][k] = img, flag
        return [Decoded(imgs, f) for imgs, f in zip(images, flags)]

    def stats(self) -> dict:
        return {"batch_sizes": dict(self.runtime.batch_sizes)}
