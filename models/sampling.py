"""The sampling math of FluxPipeline / FluxImg2ImgPipeline, per request, on diffusers' own helpers.

Everything here is per sample, so one transformer forward can carry samples at different steps,
guidance values and schedules; `euler_step` reproduces FlowMatchEulerDiscreteScheduler.step
for a whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

VAE_SCALE_FACTOR = 8  # FLUX's VAE downsamples 8x; latents are packed 2x2 on top
LATENT_CHANNELS = 16


@dataclass
class Schedule:
    """The part of the sigma schedule a request runs: timesteps[i] goes from sigmas[i] to sigmas[i+1]."""

    timesteps: torch.Tensor  # (n,) float32, in scheduler units (sigma * 1000)
    sigmas: torch.Tensor  # (n + 1,) float32, ends at 0
    scheduler: FlowMatchEulerDiscreteScheduler  # set up as the pipeline leaves it (begin index included)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def to(self, device: torch.device) -> "Schedule":
        """The schedule with its timesteps and sigmas on `device`: a step then indexes them there
        instead of copying values from the host (the scheduler stays on the host)."""
        return replace(self, timesteps=self.timesteps.to(device), sigmas=self.sigmas.to(device))


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Unpacked latent (h, w), as FluxPipeline.prepare_latents computes it."""
    return 2 * (height // (VAE_SCALE_FACTOR * 2)), 2 * (width // (VAE_SCALE_FACTOR * 2))


def make_schedule(
    scheduler_config: dict[str, Any], num_inference_steps: int, height: int, width: int, strength: float = 1.0
) -> Schedule:
    """FluxPipeline's resolution-shifted schedule; with strength < 1 the tail FluxImg2ImgPipeline runs."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    image_seq_len = (height // VAE_SCALE_FACTOR // 2) * (width // VAE_SCALE_FACTOR // 2)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, n = retrieve_timesteps(scheduler, num_inference_steps, "cpu", sigmas=sigmas, mu=mu)
    # FluxImg2ImgPipeline.get_timesteps: skip the first steps; strength 1.0 skips none.
    t_start = int(max(n - min(n * strength, n), 0))
    if n - t_start < 1:
        raise ValueError(f"strength {strength} leaves no step of {num_inference_steps}")
    scheduler.set_begin_index(t_start * scheduler.order)
    return Schedule(timesteps=timesteps[t_start:], sigmas=scheduler.sigmas[t_start:], scheduler=scheduler)


def initial_noise(
    generator: torch.Generator, num_images: int, height: int, width: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Unpacked noise (num_images, 16, h, w) drawn in one call, as the pipelines draw it."""
    h, w = latent_size(height, width)
    return randn_tensor((num_images, LATENT_CHANNELS, h, w), generator=generator, device=device, dtype=dtype)


def noised_image_latents(image_latents: torch.Tensor, noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Image latents noised to the first sigma the schedule runs (FluxImg2ImgPipeline.prepare_latents)."""
    if image_latents.shape[0] != noise.shape[0]:
        image_latents = image_latents.expand(noise.shape[0], -1, -1, -1)
    first = schedule.timesteps[:1].repeat(noise.shape[0])
    return schedule.scheduler.scale_noise(image_latents, first, noise)


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return FluxPipeline._unpack_latents(latents, height, width, VAE_SCALE_FACTOR)


@lru_cache(maxsize=64)
def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids, built on the device once per resolution."""
    h, w = (n // 2 for n in latent_size(height, width))
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3).to(dtype)


@lru_cache(maxsize=64)
def text_ids(tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(tokens, 3, device=device, dtype=dtype)


def euler_step(
    latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler.step with a sigma pair per sample (shape (B,)).

    As in the scheduler: the sample is upcast to float32, the step `dt * v` is computed in the
    model's dtype, and the result is cast back to the model's dtype.
    """
    dt = (sigma_next - sigma).to(torch.float32).view(-1, *([1] * (velocity.dim() - 1)))
    prev = latents.to(torch.float32) + (dt * velocity).to(velocity.dtype)
    return prev.to(velocity.dtype)
