"""The whole generation in one process: text encoding, denoising, decoding and safety checking.

This is what the CLI runs and what tests compare against diffusers; the Serve graph runs the
same steps split over deployments.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from models.denoise import denoise_step, start_state
from models.engine import StepHook
from models.loading import check_model_folder, load_scheduler_config, load_transformer
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
    ) -> None:
        check_model_folder(model_dir, transformer_file=transformer_file)
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
        embedding = self.text.encode([request.prompt])[0]
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
        while not state.done:
            denoise_step(self.transformer, [state])
            if on_step is not None:
                on_step(state.step, state.schedule.num_steps)
        images = self.vae.decode(state.latents, request.height, request.width)
        flags = [False] * len(images)
        if enable_safety_checker and self.safety is not None:
            images, flags = self.safety(images)
        return GenerationResult(images, flags, request.seed, time.perf_counter() - began, state.latents)
