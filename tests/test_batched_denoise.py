"""One forward over samples at different steps, guidance values and schedules equals running them alone."""

from __future__ import annotations

import copy
import dataclasses

import torch

from models.denoise import denoise_step, start_state
from models.loading import load_scheduler_config, load_transformer
from models.request import GenerationRequest
from models.text_encoding import PromptEncoder
from tests.conftest import CPU


def test_mixed_batch_equals_one_by_one(tiny_model_dir):
    transformer = load_transformer(tiny_model_dir, CPU, torch.float32)
    config = load_scheduler_config(tiny_model_dir)
    encoder = PromptEncoder(tiny_model_dir, CPU, torch.float32)
    prompts = ["a cat", "a dog in the rain", "an empty street"]
    embeds = encoder.encode(prompts)
    requests = [
        GenerationRequest(prompt=prompts[0], width=256, height=192, num_inference_steps=6, guidance_scale=2.0, seed=1),
        GenerationRequest(prompt=prompts[1], width=256, height=192, num_inference_steps=9, guidance_scale=7.5, seed=2,
                          num_images=2),
        GenerationRequest(prompt=prompts[2], width=256, height=192, num_inference_steps=4, guidance_scale=4.5, seed=3),
    ]
    states = [start_state(r, config, e.prompt_embeds, e.pooled, CPU, torch.float32)
              for r, e in zip(requests, embeds)]
    alone = copy.deepcopy(states)
    for s in alone:
        while not s.done:
            denoise_step(transformer, [s])

    # Stagger: the second request starts two steps late, so the batch mixes step indices.
    denoise_step(transformer, [states[0], states[2]])
    denoise_step(transformer, [states[0], states[2]])
    assert states[0].step == 2 and states[1].step == 0
    while not all(s.done for s in states):
        denoise_step(transformer, [s for s in states if not s.done])

    for batched, single in zip(states, alone):
        torch.testing.assert_close(batched.latents, single.latents, rtol=0, atol=1e-5)


def test_parts_of_a_request_denoise_to_the_rows_of_the_whole(tiny_model_dir):
    """A multi-image request split across replicas: each part draws every sample's noise and keeps
    its own rows, so its results are the whole request's rows (text-to-image and image-to-image)."""
    transformer = load_transformer(tiny_model_dir, CPU, torch.float32)
    config = load_scheduler_config(tiny_model_dir)
    embedding = PromptEncoder(tiny_model_dir, CPU, torch.float32).encode(["four harbours"])[0]
    whole = GenerationRequest(prompt="four harbours", width=256, height=192, num_inference_steps=5,
                              guidance_scale=3.5, seed=11, num_images=4)
    image_latents = torch.randn(1, 16, 24, 32, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 16, 24, 32, generator=torch.Generator().manual_seed(1))
    for image_start, strength in [(None, 1.0), ((image_latents, noise), 0.6)]:
        request = dataclasses.replace(whole, strength=strength)

        def run(r: GenerationRequest) -> torch.Tensor:
            state = start_state(r, config, embedding.prompt_embeds, embedding.pooled, CPU, torch.float32, image_start)
            while not state.done:
                denoise_step(transformer, [state])
            return state.latents

        full = run(request)
        parts = [run(dataclasses.replace(request, sample_range=r)) for r in [(0, 2), (2, 3), (3, 4)]]
        assert [p.shape[0] for p in parts] == [2, 1, 1]
        torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=1e-5)
