"""The shipped GPU Serve configs fit the GPUs they claim ("# GPUs: N" on their first line): Ray can
place every replica at the fewest and at the most replicas, and each replica's planned memory
(models/memory_plan.py, from the real components' shapes on the meta device) fits its share of
an 80 GB GPU with a 10% margin."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from api.schemas import DEFAULT_MAX_PIXELS
from deployments.app import AppArgs
from settings import Settings
from models.memory_plan import GIB, decoder_memory, denoiser_memory, fp8_copy_bytes, parameter_count, text_encoder_memory

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIGS = ("serve_config.1gpu.yaml", "serve_config.gpu.yaml")
GPU_BYTES = 79 * GIB  # what an H100 80GB's allocator can use (torch.cuda.mem_get_info total)
MARGIN = 0.10  # allocator fragmentation, compile workspaces, estimates that are off


def load(name: str) -> tuple[int, dict, dict[str, dict]]:
    text = (ROOT / name).read_text()
    claimed = re.match(r"# GPUs: (\d+)\n", text)
    assert claimed, f"{name} must say on its first line how many GPUs it is for ('# GPUs: N')"
    (app,) = yaml.safe_load(text)["applications"]
    return int(claimed.group(1)), app, {d["name"]: d for d in app["deployments"]}


def gpus(deployment: dict) -> float:
    return deployment.get("ray_actor_options", {}).get("num_gpus", 0)


def packs(shares: list[float], bins: int) -> bool:
    """First-fit decreasing of fractional GPU shares into `bins` GPUs, as Ray must place them."""
    free = [1.0] * bins
    for share in sorted(shares, reverse=True):
        slot = next((i for i, f in enumerate(free) if f + 1e-9 >= share), None)
        if slot is None:
            return False
        free[slot] -= share
    return True


@pytest.mark.parametrize("name", GPU_CONFIGS)
@pytest.mark.parametrize("bound", ["min_replicas", "max_replicas"])
def test_every_replica_can_be_placed_on_the_gpus_claimed(name, bound):
    claimed, _, deployments = load(name)
    shares = [gpus(d) for d in deployments.values() for _ in range(d["autoscaling_config"][bound])]
    assert packs([s for s in shares if s], claimed), f"{name}: {bound} asks for {sum(shares)} GPUs of {claimed}"


def stage_memory(app: dict, deployments: dict[str, dict]):
    args = AppArgs.model_validate(app["args"])
    env = app.get("runtime_env", {}).get("env_vars", {})
    assert env.get("SRPO_DTYPE") == "bfloat16"
    max_pixels = int(env.get("SRPO_MAX_PIXELS", DEFAULT_MAX_PIXELS))
    defaults = Settings.model_fields
    loras = dict(lora_slots=int(env.get("SRPO_LORA_DEVICE_SLOTS", defaults["lora_device_slots"].default)),
                 lora_max_rank=int(env.get("SRPO_LORA_MAX_RANK", defaults["lora_max_rank"].default)))
    return {
        "Denoiser": denoiser_memory(args.denoise_max_batch_tokens, deployments["Denoiser"]["max_ongoing_requests"],
                                    args.denoise_acceleration_modes, max_pixels, **loras),
        "TextEncoder": text_encoder_memory(args.text_batch_size, **loras),
        "Decoder": decoder_memory(),
    }


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_every_replica_fits_its_share_of_a_gpu_with_margin(name):
    _, app, deployments = load(name)
    for stage, memory in stage_memory(app, deployments).items():
        share = gpus(deployments[stage]) * GPU_BYTES * (1 - MARGIN)
        assert memory.total <= share, (
            f"{name}: {stage} needs {memory.total / GIB:.1f} GiB "
            f"({ {k: round(v / GIB, 1) for k, v in memory.parts.items()} }), its share is {share / GIB:.1f} GiB"
        )
    assert {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}.items() <= app["runtime_env"]["env_vars"].items()


def test_the_plan_counts_the_real_components():
    """Parameter counts of the published checkpoints, and the fp8 copy below the bf16 blocks' size."""
    assert parameter_count("transformer") == 11_901_408_320
    assert parameter_count("text_encoder_2") == 4_762_310_656  # T5-XXL encoder
    assert 8 * GIB < fp8_copy_bytes() < 9 * GIB


def test_vae_decodes_at_most_the_cap_per_call_and_tiles_large_images(tiny_model_dir, monkeypatch):
    import torch

    from models import vae as vae_module

    codec = vae_module.VaeCodec(tiny_model_dir, torch.device("cpu"), torch.float32)
    latents = torch.randn(5, 64, 64, generator=torch.Generator().manual_seed(0))  # 5 images of 128x128
    whole = codec.decode(latents, 128, 128)  # 5 x 16384 pixels: under the default cap, one call
    calls = []
    decode = codec.vae.decode
    monkeypatch.setattr(codec.vae, "decode", lambda z, **kw: calls.append((len(z), codec.vae.use_tiling)) or decode(z, **kw))
    monkeypatch.setattr(vae_module, "MAX_DECODE_PIXELS", 2 * 128 * 128)
    chunked = codec.decode(latents, 128, 128)
    assert calls == [(2, False), (2, False), (1, False)]
    assert all(abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(whole, chunked))
    calls.clear()
    monkeypatch.setattr(vae_module, "TILE_ABOVE_PIXELS", 100 * 100)
    codec.decode(latents[:2], 128, 128)
    assert calls == [(1, True), (1, True)]
