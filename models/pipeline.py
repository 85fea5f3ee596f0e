"""The whole generation in one process: text encoding, denoising, decoding and safety checking.

This is what the CLI runs and what tests compare against diffusers; the Serve graph runs the
same steps split over deployments.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import torch

from models.denoise import denoise_step, start_state
from models.engine import StepHook
from models.loading import check_model_folder, load_scheduler_config, load_transformer
from models.lora_files import linear_shapes
from models.lora_layers import NO_ADAPTER, LoraBank
from models.lora_residency import LoraResidency
from models.request import GenerationRequest, GenerationResult
from models.text_encoding import PromptEncoder
from models.vae import VaeCodec
from safety.checker import SafetyChecker


class SRPOPipeline:
    def __init__(
        self,
        model_dir: Path,
        safety_dir: Path | None,
        device: torch.device,
        dtype: torch.dtype,
        transformer_file: Path | None = None,
        lora_max_rank: int = 128,
    ) -> None:
        check_model_folder(model_dir, transformer_file=transformer_file)
        self.lora_max_rank = lora_max_rank
        self._loras: dict[str, LoraResidency] = {}  # made on the first request with LoRAs
        self.device, self.dtype = device, dtype
        self.scheduler_config = load_scheduler_config(model_dir)
        self.text = PromptEncoder(model_dir, device, dtype)
        self.transformer = load_transformer(model_dir, device, dtype, transformer_file)
        self.vae = VaeCodec(model_dir, device, dtype)
        self.safety = SafetyChecker(safety_dir, device, dtype) if safety_dir is not None else None

    @torch.no_grad()
    def generate(
        self, request: GenerationRequest, enable_safety_checker: bool = True, on_step: StepHook | None = None
    ) -> GenerationResult:
        """`on_step(done, total)` is called after every denoising step."""
        began = time.perf_counter()
        tiers = self._lora_tiers() if request.loras else {}
        slots = {component: asyncio.run(tier.acquire(request.loras)) for component, tier in tiers.items()}
        try:
            return self._generate(request, enable_safety_checker, on_step, began, slots)
        finally:
            for component, slot in slots.items():
                tiers[component].release(slot)

    def _lora_tiers(self) -> dict[str, LoraResidency]:
        """One adapter slot on the transformer and on CLIP: this pipeline runs one request at a time."""
        if not self._loras:
            for component, module in (("transformer", self.transformer), ("text_encoder", self.text.clip)):
                bank = LoraBank(module, slots=2, max_rank=self.lora_max_rank)
                self._loras[component] = LoraResidency(bank, component, linear_shapes(module), host_max_bytes=0)
        return self._loras

    def _generate(self, request: GenerationRequest, enable_safety_checker: bool, on_step: StepHook | None,
                  began: float, slots: dict[str, int]) -> GenerationResult:
        clip = self._loras.get("text_encoder")
        embedding = self.text.encode([request.prompt], clip and clip.bank, [slots.get("text_encoder", NO_ADAPTER)])[0]
        image_start = None
        if request.image is not None:
            image_start = self.vae.encode_with_noise(
                request.image, request.height, request.width, request.seed, request.num_images
            )
        state = start_state(
            request,
            self.scheduler_config,
            embedding.prompt_embeds,
            embedding.pooled,
            self.device,
            self.dtype,
            image_start,
        )
        state.adapter = slots.get("transformer", NO_ADAPTER)
        bank = self._loras["transformer"].bank if self._loras else None
        while not state.done:
            denoise_step(self.transformer, [state], bank)
            if on_step is not None:
                on_step(state.step, state.schedule.num_steps)
        images = self.vae.decode(state.latents, request.height, request.width)
        flags = [False] * len(images)
        if enable_safety_checker and self.safety is not None:
            images, flags = self.safety(images)
        return GenerationResult(images, flags, request.seed, time.perf_counter() - began, state.latents)
