"""The compile budget of the compiled modes, on CPU with inductor and the tiny model: warm-up
compiles a bounded number of graphs, after which no size, batch or step-cache subset recompiles."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from torch._dynamo.utils import counters

from models.acceleration import PLANS, WARMUP_BATCH_SIZES, WARMUP_SIZES, Accelerator
from models.denoise import denoise_step, start_state
from models.loading import load_scheduler_config, load_transformer
from models.request import GenerationRequest
from models.step_cache import StepCache
from tests.conftest import CPU

# Two block classes (double, single) x two batch classes (1, more) = 4 graphs.
GRAPH_BUDGET = 4
PRESETS = ((1024, 768), (1024, 1024), (512, 512), (768, 1024), (576, 1024), (1024, 576))


@pytest.fixture(scope="module")
def compiled(tiny_model_dir, tmp_path_factory):
    torch._dynamo.reset()
    counters.clear()
    transformer = load_transformer(tiny_model_dir, CPU, torch.float32)
    config = load_scheduler_config(tiny_model_dir)
    accelerator = Accelerator(transformer, ["none", "regular"], compile_on_cpu=True,
                              compile_cache_dir=tmp_path_factory.mktemp("inductor"))
    began = time.perf_counter()
    accelerator.warm_up(config, torch.float32, WARMUP_SIZES, WARMUP_BATCH_SIZES)
    warm_up_s = time.perf_counter() - began
    graphs = counters["stats"]["unique_graphs"]
    yield accelerator, config, graphs, warm_up_s
    torch._dynamo.reset()


def test_warm_up_compiles_a_bounded_number_of_graphs(compiled):
    accelerator, _, graphs, warm_up_s = compiled
    print(f"warm-up: {graphs} graphs in {warm_up_s:.1f} s")
    assert set(accelerator.modules) == {"none", "regular"}
    assert 0 < graphs <= GRAPH_BUDGET
    assert (accelerator.compile_cache / "compile-artifacts.bin").is_file()


@torch._dynamo.config.patch(error_on_recompile=True)
def test_no_size_batch_or_cache_subset_recompiles(compiled):
    accelerator, config, _, _ = compiled
    module = accelerator.modules["regular"]
    odd = ((1008, 592), (336, 1520), (32, 48))  # 16x16 (one image token) would compile once more
    for n, (width, height) in enumerate((*PRESETS, *odd)):
        batch = 1 + n % 5
        states = []
        for seed, threshold in ((n, 0.0), (n + 100, 1e9)):  # one request always recomputes, one always reuses
            request = GenerationRequest(prompt="", width=width, height=height, num_inference_steps=3,
                                        guidance_scale=3.5, seed=seed, num_images=min(batch, 4))
            state = start_state(request, config, torch.zeros(1, 512, module.config.joint_attention_dim),
                                torch.zeros(1, module.config.pooled_projection_dim), CPU, torch.float32)
            state.cache = StepCache(threshold)
            states.append(state)
        for _ in range(2):  # the first step runs every sample, the second only the recomputing one
            denoise_step(module, states)
    assert states[1].cache.reused > 0 and states[0].cache.reused == 0


@torch._dynamo.config.patch(error_on_recompile=True)
def test_regular_runs_end_to_end_through_the_engine(compiled):
    """`regular` as the Denoiser serves it: the engine, the compiled module and the step cache."""
    from models.engine import DenoiseEngine

    accelerator, config, _, _ = compiled
    engine = DenoiseEngine(accelerator.modules["none"], 16384, modules=accelerator.modules)
    module = accelerator.modules["regular"]
    request = GenerationRequest(prompt="", width=256, height=128, num_inference_steps=4, guidance_scale=3.5,
                                seed=5, num_images=2)
    state = start_state(request, config, torch.zeros(1, 512, module.config.joint_attention_dim),
                        torch.zeros(1, module.config.pooled_projection_dim), CPU, torch.float32)
    state.cache = accelerator.step_cache("regular")

    async def run():
        return await engine.submit(state, mode="regular")

    latents = asyncio.run(run())
    assert latents.shape == (2, 128, 64) and torch.isfinite(latents).all()
    assert state.cache.sample_steps == 8 and PLANS["regular"].cache_threshold == state.cache.threshold
