"""The denoising state of one request, and one transformer forward over many such states.

Samples of the same resolution share a forward even at different steps, guidance values and
schedules: FluxTransformer2DModel takes a timestep and a guidance value per sample, and the
Euler update is applied per sample afterwards. A state may carry a step cache (models/step_cache.py);
a forward with any such state runs the cache-aware forward, which keeps every sample's own decision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel

from models.request import GenerationRequest
from models.sampling import (
    Schedule,
    euler_step,
    image_ids,
    initial_noise,
    make_schedule,
    noised_image_latents,
    pack,
    text_ids,
)
from models.lora_layers import NO_ADAPTER, LoraBank
from models.step_cache import StepCache, forward_with_step_cache


@dataclass
class DenoiseState:
    """One request's samples on their way through their own schedule."""

    latents: torch.Tensor  # packed (n, L, 64)
    prompt_embeds: torch.Tensor  # (n, 512, D)
    pooled: torch.Tensor  # (n, D)
    guidance_scale: float
    schedule: Schedule
    height: int
    width: int
    step: int = 0
    cache: StepCache | None = None  # set for accelerated modes that reuse blocks between steps
    adapter: int = NO_ADAPTER  # the LoRA bank slot of its (combined) LoRAs

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.num_steps

    @property
    def num_samples(self) -> int:
        return self.latents.shape[0]

    @property
    def resolution(self) -> tuple[int, int]:
        return self.height, self.width

    @classmethod
    def start(
        cls,
        unpacked_latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        guidance_scale: float,
        schedule: Schedule,
        height: int,
        width: int,
    ) -> "DenoiseState":
        """A state from unpacked start latents and one prompt's embeddings (repeated per image)."""
        n = unpacked_latents.shape[0]
        return cls(
            latents=pack(unpacked_latents),
            prompt_embeds=prompt_embeds.expand(n, -1, -1),
            pooled=pooled.expand(n, -1),
            guidance_scale=guidance_scale,
            schedule=schedule,
            height=height,
            width=width,
        )


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
    ).to(device)
    if image_latents_and_noise is None:
        generator = torch.Generator("cpu").manual_seed(request.seed)
        latents = initial_noise(generator, request.num_images, request.height, request.width, device, dtype)
    else:
        image_latents, noise = image_latents_and_noise
        latents = noised_image_latents(image_latents.to(device, dtype), noise.to(device, dtype), schedule)
    if request.sample_range is not None:  # the noise of every sample is drawn, so each keeps its own
        latents = latents[slice(*request.sample_range)]
    return DenoiseState.start(
        latents,
        prompt_embeds.to(device, dtype),
        pooled.to(device, dtype),
        request.guidance_scale,
        schedule,
        request.height,
        request.width,
    )


@torch.no_grad()
def denoise_step(
    transformer: FluxTransformer2DModel, states: list[DenoiseState], loras: LoraBank | None = None
) -> None:
    """Advance every state by one step with a single transformer forward (same resolution only).

    With `loras` (the bank attached to `transformer`), each state's samples use its adapter slot."""
    if not states:
        return
    height, width = states[0].resolution
    if any(s.resolution != (height, width) for s in states):
        raise ValueError("one forward can only carry samples of one resolution")
    device = states[0].latents.device
    dtype = states[0].latents.dtype
    latents = torch.cat([s.latents for s in states])
    # Everything per step is built on the device (schedules live there; see start_state): a copy
    # from the host would make the host wait for the device before every forward.
    t = torch.cat([s.schedule.timesteps[s.step].expand(s.num_samples) for s in states])
    sigma = torch.cat([s.schedule.sigmas[s.step].expand(s.num_samples) for s in states])
    sigma_next = torch.cat([s.schedule.sigmas[s.step + 1].expand(s.num_samples) for s in states])
    guidance = torch.cat(
        [torch.full((s.num_samples,), s.guidance_scale, dtype=torch.float32, device=device) for s in states]
    )
    inputs = dict(
        hidden_states=latents,
        timestep=t.to(dtype) / 1000,  # the pipeline casts timesteps to the latents' dtype first
        guidance=guidance if transformer.config.guidance_embeds else None,
        pooled_projections=torch.cat([s.pooled for s in states]),
        encoder_hidden_states=torch.cat([s.prompt_embeds for s in states]),
        txt_ids=text_ids(states[0].prompt_embeds.shape[1], device, dtype),
        img_ids=image_ids(height, width, device, dtype),
    )
    slots = [s.adapter for s in states for _ in range(s.num_samples)]
    if any(slot != NO_ADAPTER for slot in slots) and loras is None:
        raise ValueError("a state carries a LoRA adapter but the forward has no LoRA bank")
    with loras.active(slots) if loras is not None else contextlib.nullcontext():
        if any(s.cache is not None for s in states):
            velocity = forward_with_step_cache(
                transformer, [s.cache for s in states], [s.num_samples for s in states], loras=loras, **inputs
            )
        else:
            velocity = transformer(**inputs, return_dict=False)[0]
    updated = euler_step(latents, velocity, sigma, sigma_next)
    for s, new in zip(states, updated.split([s.num_samples for s in states])):
        s.latents = new
        s.step += 1
