"""Acceleration modes on CPU: the fallback to `none` and its note, the module plumbing the GPU modes
use, and the per-request step cache (which is plain PyTorch and runs here)."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from deployments.denoiser import Denoiser
from models.acceleration import (
    PLANS,
    Accelerator,
    ModePlan,
    _copy_sharing_modulation,
    _is_fp8_linear,
    build_module,
    unavailable_reason,
)
from models.denoise import DenoiseState, denoise_step, start_state
from models.loading import load_scheduler_config, load_transformer
from models.request import GenerationRequest
from models.step_cache import StepCache
from models.text_encoding import PromptEncoder
from tests.conftest import CPU


@pytest.fixture(scope="module")
def transformer(tiny_model_dir):
    return load_transformer(tiny_model_dir, CPU, torch.float32)


@pytest.fixture(scope="module")
def make_state(tiny_model_dir):
    config = load_scheduler_config(tiny_model_dir)
    encoder = PromptEncoder(tiny_model_dir, CPU, torch.float32)

    def make(seed: int, steps: int, guidance: float, num_images: int = 1, width: int = 128) -> DenoiseState:
        request = GenerationRequest(prompt=f"prompt {seed}", width=width, height=128, num_inference_steps=steps,
                                    guidance_scale=guidance, seed=seed, num_images=num_images)
        embedding = encoder.encode([request.prompt])[0]
        return start_state(request, config, embedding.prompt_embeds, embedding.pooled, CPU, torch.float32)

    return make


def run_alone(transformer, state: DenoiseState) -> DenoiseState:
    while not state.done:
        denoise_step(transformer, [state])
    return state


def test_cpu_falls_back_to_none_and_says_so(transformer):
    accelerator = Accelerator(transformer)
    assert set(accelerator.modules) == {"none"} and accelerator.modules["none"] is transformer
    assert accelerator.resolve("none") == ("none", None)
    assert accelerator.resolve("high") == (
        "none", "acceleration 'high' is not available on cpu (needs a CUDA GPU with torchao); ran 'none'")
    assert accelerator.resolve("regular") == (
        "none", "acceleration 'regular' is not available on cpu (needs a CUDA GPU); ran 'none'")
    assert accelerator.step_cache("none") is None
    with pytest.raises(ValueError):
        accelerator.resolve("turbo")


def test_reasons_on_a_gpu_and_disabled_modes(transformer, monkeypatch):
    gpu = torch.device("cuda")
    assert unavailable_reason(PLANS["none"], gpu) is None and unavailable_reason(PLANS["regular"], gpu) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))  # an A100
    assert unavailable_reason(PLANS["high"], gpu) == "needs fp8 matmuls (compute capability 8.9+)"
    mode, note = Accelerator(transformer, modes=["none"]).resolve("regular")
    assert mode == "none" and "(disabled in this deployment)" in note
    with pytest.raises(ValueError):
        Accelerator(transformer, modes=["none", "turbo"])


def test_compiled_twin_shares_weights_and_keeps_the_original_eager(transformer, make_state):
    """The `regular` plumbing with dynamo's eager backend: every block traces as one graph
    (fullgraph), the twin shares all weights, and the loaded module is left untouched."""
    twin = build_module(transformer, ModePlan(compile=True, fp8=False, cache_threshold=None), {"backend": "eager"})
    assert twin is not transformer and twin.x_embedder is transformer.x_embedder
    assert type(transformer.transformer_blocks[0]).__name__ == "FluxTransformerBlock"
    assert twin.transformer_blocks[0]._orig_mod is transformer.transformer_blocks[0]
    state = make_state(1, 3, 3.5, num_images=2)
    twin_state = copy.deepcopy(state)
    run_alone(transformer, state)
    run_alone(twin, twin_state)
    torch.testing.assert_close(twin_state.latents, state.latents, rtol=0, atol=1e-6)


def test_fp8_copy_keeps_modulation_shared_and_selects_the_block_linears(transformer):
    for block in (transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]):
        clone = _copy_sharing_modulation(block)
        for name, child in block.named_children():
            assert (getattr(clone, name) is child) == name.startswith("norm")
        chosen = {fqn for fqn, m in clone.named_modules() if _is_fp8_linear(m, fqn)}
        linears = {fqn for fqn, m in clone.named_modules() if isinstance(m, torch.nn.Linear)}
        assert chosen == {fqn for fqn in linears if not fqn.startswith("norm")} and chosen
    assert "attn.to_q" in chosen and "proj_mlp" in chosen and "norm.linear" not in chosen


def test_denoiser_runs_none_and_notes_the_fallback():
    denoiser = Denoiser.func_or_class(warmup_sizes=[(128, 128)])
    encoder = PromptEncoder(denoiser.runtime.paths.model_dir, CPU, torch.float32)
    request = GenerationRequest(prompt="a fox", width=128, height=128, num_inference_steps=3, guidance_scale=3.5,
                                seed=4)
    embedding = encoder.encode([request.prompt])[0]

    async def collect(acceleration: str):
        return [u async for u in denoiser.denoise(request, embedding, acceleration=acceleration)]

    high, none = asyncio.run(collect("high")), asyncio.run(collect("none"))
    assert high[0].step == 0 and high[0].note == (
        "acceleration 'high' is not available on cpu (needs a CUDA GPU with torchao); ran 'none'")
    assert none[0].note is None
    steps = [u.step for u in high]  # progress is coalesced: increasing, ending with the latents at 3/3
    assert steps[0] == 0 and steps[-1] == 3 and steps == sorted(set(steps))
    assert [u.latents is not None for u in high] == [False] * (len(high) - 1) + [True]
    assert torch.equal(high[-1].latents, none[-1].latents)
    assert denoiser.stats()["acceleration_modes"] == ["none"]


def test_step_cache_at_threshold_zero_equals_the_uncached_forward(transformer, make_state):
    plain = [make_state(1, 5, 2.0, num_images=2), make_state(2, 4, 6.0)]
    cached = copy.deepcopy(plain)
    for s in cached:
        s.cache = StepCache(0.0)
    while not all(s.done for s in plain):
        denoise_step(transformer, [s for s in plain if not s.done])
        denoise_step(transformer, [s for s in cached if not s.done])
    for p, c in zip(plain, cached):
        assert torch.equal(p.latents, c.latents)
        assert c.cache.reused == 0 and c.cache.computed == p.schedule.num_steps * p.num_samples


def test_step_cache_decides_per_sample_in_a_mixed_batch(transformer, make_state):
    """Each sample skips on its own first-block change; its result equals running it alone with its
    cache, whatever else shares the forward (some forwards mix skipping and computing samples)."""
    threshold = 0.15
    states = [make_state(1, 12, 2.0, num_images=2), make_state(2, 9, 6.0), make_state(3, 14, 3.5, num_images=2)]
    for s in states:
        s.cache = StepCache(threshold)
    lone = [run_alone(transformer, copy.deepcopy(s)) for s in states]
    mixed_forwards = 0
    forward = 0
    while not all(s.done for s in states):
        # Staggered joins: the second request starts three forwards late, the third five.
        batch = [s for s, start in zip(states, (0, 3, 5)) if forward >= start and not s.done]
        reused_before = sum(s.cache.reused for s in batch)
        denoise_step(transformer, batch)
        skipped = sum(s.cache.reused for s in batch) - reused_before
        mixed_forwards += 0 < skipped < sum(s.num_samples for s in batch)
        forward += 1
    assert mixed_forwards > 0
    for batched, single in zip(states, lone):
        assert (batched.cache.reused, batched.cache.computed) == (single.cache.reused, single.cache.computed)
        assert 0 < batched.cache.reused
        torch.testing.assert_close(batched.latents, single.latents, rtol=0, atol=1e-5)


def test_fp8_config_is_the_pinned_torchao_api_and_leaves_inductor_alone(tmp_path, monkeypatch):
    """The exact config `high` quantizes with, built against the pinned torchao (CPU cannot quantize)."""
    from torchao.quantization import PerRow

    from models.acceleration import fp8_config, prepare_compile

    config = fp8_config()
    assert config.granularity == [PerRow(), PerRow()] and config.activation_dtype == torch.float8_e4m3fn
    assert config.set_inductor_config is False  # torchao's default turns on coordinate descent for every compile
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch._inductor.config, "coordinate_descent_tuning", True)
    prepare_compile()
    assert torch._inductor.config.coordinate_descent_tuning is False


def test_attention_backend_is_a_setting_applied_to_every_layer(monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName

    from models.attention import choose_attention_backend
    from settings import get_settings

    assert choose_attention_backend("auto", torch.device("cuda"), torch.bfloat16) == "_native_flash"
    assert choose_attention_backend("auto", CPU, torch.float32) == "native"
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        choose_attention_backend("fast", CPU, torch.float32)
    monkeypatch.setenv("SRPO_ATTENTION_BACKEND", "_native_math")
    get_settings.cache_clear()
    try:
        denoiser = Denoiser.func_or_class(warmup_sizes=[(128, 128)])
    finally:
        get_settings.cache_clear()
    layers = [m for m in denoiser.transformer.modules() if hasattr(m, "processor")]
    assert layers and all(m.processor._attention_backend == AttentionBackendName._NATIVE_MATH for m in layers)
