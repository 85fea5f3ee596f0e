"""One forward over samples at different steps, guidance values and schedules equals running them alone."""

from __future__ import annotations

import copy

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
