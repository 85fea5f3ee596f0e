"""The compile budget of the compiled modes, on CPU with inductor and the tiny model: warm-up
compiles a bounded number of graphs, after which no size, batch or step-cache subset recompiles."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from torch._dynamo.utils import counters

from models.acceleration import WARMUP_BATCH_SIZES, WARMUP_SIZES, Accelerator
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
    with pytest.MonkeyPatch.context() as patch:  # inductor's cache folder for this module only
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        accelerator = Accelerator(transformer, ["none", "regular"], compile_on_cpu=True)
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


def test_the_denoiser_serves_regular_on_cpu_when_the_setting_allows(compiled, monkeypatch, tmp_path):
    """`regular` end to end as the Denoiser serves it (engine, compiled blocks, step cache), on CPU
    because SRPO_COMPILE_ON_CPU allows it; without the setting it falls back to `none`."""
    from deployments.denoiser import Denoiser
    from models.text_encoding import PromptEncoder
    from settings import get_settings

    monkeypatch.setenv("SRPO_COMPILE_ON_CPU", "true")
    get_settings.cache_clear()
    try:
        denoiser = Denoiser.func_or_class(acceleration_modes=["none", "regular"], compile_cache_dir=str(tmp_path))
    finally:
        get_settings.cache_clear()
    assert denoiser.stats()["acceleration_modes"] == ["none", "regular"]
    request = GenerationRequest(prompt="a fox", width=256, height=128, num_inference_steps=4, guidance_scale=3.5,
                                seed=5, num_images=2)
    embedding = PromptEncoder(denoiser.runtime.paths.model_dir, CPU, torch.float32).encode([request.prompt])[0]

    async def collect():
        return [u async for u in denoiser.denoise(request, embedding, acceleration="regular")]

    updates = asyncio.run(collect())
    assert updates[0].note is None and updates[-1].step == 4
    assert updates[-1].latents.shape == (2, 128, 64) and torch.isfinite(updates[-1].latents).all()
