"""The whole generation in one process: text encoding, denoising, decoding and safety checking.

This is what the CLI runs and what tests compare against diffusers; the Serve graph runs the
same steps split over deployments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.denoise import DenoiseState, denoise_step
from models.engine import StepHook
from models.loading import check_model_folder, load_scheduler_config, load_transformer
from models.request import GenerationRequest
from models.sampling import initial_noise, make_schedule, noised_image_latents
from models.text_encoding import PromptEncoder
from models.vae import VaeCodec
from safety.checker import SafetyChecker


@dataclass
class GenerationResult:
    images: list[np.ndarray]  # uint8 HxWx3
    has_nsfw_concepts: list[bool]
    seed: int
    inference_seconds: float
    latents: torch.Tensor | None = None  # final packed latents (num_images, L, 64), when kept


def start_state(
    request: GenerationRequest,
    scheduler_config: dict,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    image_latents_and_noise: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DenoiseState:
    """The first denoising state of a request: its schedule and its start latents."""
    schedule = make_schedule(
        scheduler_config, request.num_inference_steps, request.height, request.width, request.strength
    )
    if image_latents_and_noise is None:
        generator = torch.Generator("cpu").manual_seed(request.seed)
        latents = initial_noise(generator, request.num_images, request.height, request.width, device, dtype)
    else:
        image_latents, noise = image_latents_and_noise
        latents = noised_image_latents(image_latents.to(device, dtype), noise.to(device, dtype), schedule)
    return DenoiseState.start(
        latents,
        prompt_embeds.to(device, dtype),
        pooled.to(device, dtype),
        request.guidance_scale,
        schedule,
        request.height,
        request.width,
    )


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
