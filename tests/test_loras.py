"""LoRAs without Ray: the file layouts people publish, pixels against diffusers' own LoRA loading
(`load_lora_weights` + `set_adapters`), different LoRAs sharing one forward, compiled blocks that
never recompile as adapters change, and files that must be refused."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline
from PIL import Image
from safetensors.torch import save_file

from models.acceleration import PLANS, build_module
from models.denoise import start_state
from models.engine import DenoiseEngine
from models.lora_files import LoraFormatError, LowRank, combine, linear_shapes, read_lora
from models.lora_layers import NO_ADAPTER, LoraBank
from models.lora_residency import LoraResidency
from models.pipeline import SRPOPipeline
from models.request import GenerationRequest, LoraRef
from tests import loras
from tests.conftest import CPU

PROMPT = "a lantern in the fog"


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        "diffusers": loras.diffusers_lora(folder / "diffusers.safetensors", 1, alpha=2.0, text_encoder=True),
        "kohya": loras.kohya_lora(folder / "kohya.safetensors", 2),
        "xlabs": loras.xlabs_lora(folder / "xlabs.safetensors", 3),
        "rank8": loras.diffusers_lora(folder / "rank8.safetensors", 4, rank=8),
        "sdxl": loras.sdxl_lora(folder / "sdxl.safetensors", 5),
        "wrong_shape": loras.wrong_shape_lora(folder / "wrong_shape.safetensors", 6),
    }


def ref(file: Path, scale: float = 1.0) -> LoraRef:
    return LoraRef(source=file.name, file=str(file), digest=file.stem, scale=scale)


@pytest.fixture(scope="module")
def ours(tiny_model_dir) -> SRPOPipeline:
    return SRPOPipeline(tiny_model_dir, None, CPU, torch.float32)


def _reference(pipe_class, model_dir: Path, files: list[Path], scales: list[float]):
    pipe = pipe_class.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for i, file in enumerate(files):
        pipe.load_lora_weights(str(file), adapter_name=f"lora{i}")
    pipe.set_adapters([f"lora{i}" for i in range(len(files))], scales)
    return pipe


def _max_diff(reference: Image.Image, ours: np.ndarray) -> int:
    return int(np.abs(np.asarray(reference).astype(int) - ours.astype(int)).max())


@pytest.mark.parametrize("names, scales", [
    (["diffusers"], [0.8]),  # with a CLIP part and alpha != rank
    (["kohya", "xlabs"], [1.2, -0.6]),
    (["diffusers", "kohya", "xlabs"], [0.7, 1.0, 0.5]),
])
def test_text_to_image_with_loras_matches_diffusers(ours, tiny_model_dir, lora_files, names, scales):
    files = [lora_files[n] for n in names]
    request = GenerationRequest(prompt=PROMPT, width=128, height=96, num_inference_steps=3, guidance_scale=3.5,
                                seed=11, num_images=2, loras=tuple(ref(f, s) for f, s in zip(files, scales)))
    result = ours.generate(request, enable_safety_checker=False)
    reference = _reference(FluxPipeline, tiny_model_dir, files, scales)
    kwargs = dict(height=96, width=128, num_inference_steps=3, guidance_scale=3.5, num_images_per_prompt=2)
    latents = reference(PROMPT, generator=torch.Generator("cpu").manual_seed(11), output_type="latent", **kwargs).images
    images = reference(PROMPT, generator=torch.Generator("cpu").manual_seed(11), **kwargs).images
    torch.testing.assert_close(result.latents, latents, rtol=0, atol=1e-5)
    assert max(_max_diff(r, o) for r, o in zip(images, result.images)) <= 2
    plain = ours.generate(GenerationRequest(prompt=PROMPT, width=128, height=96, num_inference_steps=3,
                                            guidance_scale=3.5, seed=11), enable_safety_checker=False)
    assert _max_diff(images[0], plain.images[0]) > 10  # the LoRAs changed the image


def test_image_to_image_with_loras_matches_diffusers(ours, tiny_model_dir, lora_files):
    files, scales = [lora_files["diffusers"], lora_files["xlabs"]], [1.0, 0.9]
    source = Image.fromarray((np.random.RandomState(3).rand(96, 160, 3) * 255).astype(np.uint8))
    request = GenerationRequest(prompt=PROMPT, width=160, height=96, num_inference_steps=10, guidance_scale=4.5,
                                seed=5, image=source, strength=0.6, loras=tuple(ref(f, s) for f, s in zip(files, scales)))
    result = ours.generate(request, enable_safety_checker=False)
    reference = _reference(FluxImg2ImgPipeline, tiny_model_dir, files, scales)
    kwargs = dict(image=source, height=96, width=160, strength=0.6, num_inference_steps=10, guidance_scale=4.5)
    latents = reference(PROMPT, generator=torch.Generator("cpu").manual_seed(5), output_type="latent", **kwargs).images
    images = reference(PROMPT, generator=torch.Generator("cpu").manual_seed(5), **kwargs).images
    torch.testing.assert_close(result.latents, latents, rtol=0, atol=1e-5)
    assert _max_diff(images[0], result.images[0]) <= 2


def test_combined_adapter_is_the_scaled_sum(lora_files):
    a, b = read_lora(lora_files["diffusers"]), read_lora(lora_files["rank8"])
    combined = combine([(a, 0.5), (b, -2.0)], "transformer")
    path = "transformer_blocks.0.attn.to_q"
    want = 0.5 * a.parts["transformer"][path].up @ a.parts["transformer"][path].down \
        - 2.0 * b.parts["transformer"][path].up @ b.parts["transformer"][path].down
    torch.testing.assert_close(combined[path].up @ combined[path].down, want)
    assert combined[path].rank == 4 + 8


@pytest.mark.parametrize("name, message", [
    ("sdxl", "no FLUX layout"),
    ("wrong_shape", "shapes do not fit this model"),
])
def test_files_for_other_models_are_refused_naming_keys(tiny_model_dir, lora_files, name, message):
    pipe = SRPOPipeline(tiny_model_dir, None, CPU, torch.float32)
    request = GenerationRequest(prompt=PROMPT, width=64, height=64, num_inference_steps=1, guidance_scale=3.5, seed=1,
                                loras=(ref(lora_files[name]),))
    with pytest.raises(LoraFormatError, match=message) as failure:
        pipe.generate(request, enable_safety_checker=False)
    assert name in str(failure.value)  # the LoRA is named (its source)
    if name == "wrong_shape":
        assert "transformer.transformer_blocks.0.attn.to_q" in str(failure.value)


def test_pickles_nan_weights_and_dora_are_refused(tmp_path):
    pickle = tmp_path / "lora.safetensors"
    torch.save({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, pickle)
    with pytest.raises(LoraFormatError, match="pickle"):
        read_lora(pickle)
    nan = tmp_path / "nan.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.full((2, 16), math.nan),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 2)}, str(nan))
    with pytest.raises(LoraFormatError, match="not finite"):
        read_lora(nan)
    dora = tmp_path / "dora.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 16),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 2),
               "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(16)}, str(dora))
    with pytest.raises(LoraFormatError, match="DoRA"):
        read_lora(dora)


def _engine_parts(model_dir: Path, transformer, slots: int = 8):
    from models.loading import load_scheduler_config

    bank = LoraBank(transformer, slots=slots, max_rank=16)
    residency = LoraResidency(bank, "transformer", linear_shapes(transformer), host_max_bytes=1 << 30)
    return load_scheduler_config(model_dir), bank, residency


async def _run_requests(engine: DenoiseEngine, residency: LoraResidency, scheduler_config, encoder, requests):
    """Each request as the Serve graph runs it: its CLIP adapter for its prompt, its transformer adapter
    in the shared engine."""
    clip = LoraResidency(LoraBank(encoder.clip, slots=8, max_rank=16), "text_encoder", linear_shapes(encoder.clip),
                         host_max_bytes=1 << 30)

    async def one(request: GenerationRequest) -> torch.Tensor:
        clip_slot = await clip.acquire(request.loras)
        embedding = encoder.encode([request.prompt], clip.bank, [clip_slot])[0]
        clip.release(clip_slot)
        state = start_state(request, scheduler_config, embedding.prompt_embeds, embedding.pooled, CPU, torch.float32)
        state.adapter = await residency.acquire(request.loras)
        try:
            return await engine.submit(state)
        finally:
            residency.release(state.adapter)

    return await asyncio.gather(*(one(r) for r in requests))


def test_requests_with_different_loras_share_forwards_and_equal_their_alone_runs(ours, tiny_model_dir, lora_files):
    sets = [(), (ref(lora_files["diffusers"], 0.8),), (ref(lora_files["kohya"]),),
            (ref(lora_files["xlabs"], 1.5), ref(lora_files["rank8"], -0.4)), (), (ref(lora_files["kohya"], 0.3),)]
    requests = [GenerationRequest(prompt=f"{PROMPT} {i}", width=64, height=64, num_inference_steps=4,
                                  guidance_scale=3.5, seed=i, loras=s) for i, s in enumerate(sets)]
    scheduler_config, bank, residency = _engine_parts(tiny_model_dir, ours.transformer)
    engine = DenoiseEngine(ours.transformer, max_batch_tokens=1 << 20, loras=bank)
    together = asyncio.run(_run_requests(engine, residency, scheduler_config, ours.text, requests))
    assert any(count > 1 for count in engine.adapters_per_forward), engine.adapters_per_forward  # mixed forwards
    assert max(engine.batch_sizes) == len(requests)  # all six shared a forward
    for request, latents in zip(requests, together):
        alone = ours.generate(request, enable_safety_checker=False).latents
        torch.testing.assert_close(latents, alone, rtol=1e-5, atol=1e-5)


def test_compiled_blocks_never_recompile_as_loras_change(tiny_model_dir, lora_files, tmp_path, monkeypatch):
    """`regular`'s compiled blocks on CPU (inductor): after a warm-up of each batch size with and
    without adapters, 20 requests with changing LoRA sets, ranks and scales compile nothing more
    (dynamo's graph count, which counts every recompile, stays put)."""
    from models.acceleration import prepare_compile
    from models.loading import load_transformer
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    prepare_compile()
    transformer = load_transformer(tiny_model_dir, CPU, torch.float32)
    scheduler_config, bank, residency = _engine_parts(tiny_model_dir, transformer, slots=4)
    compiled = build_module(transformer, PLANS["regular"], {"dynamic": True})
    engine = DenoiseEngine(transformer, max_batch_tokens=1 << 20, modules={"regular": compiled}, loras=bank)
    encoder = SRPOPipeline(tiny_model_dir, None, CPU, torch.float32).text
    files = [lora_files[n] for n in ("diffusers", "kohya", "xlabs", "rank8")]

    def requests(count: int, offset: int) -> list[GenerationRequest]:
        out = []
        for i in range(count):
            k = (i + offset) % 5
            chosen = tuple(ref(files[(k + j) % 4], scale=0.25 * (i + 1)) for j in range(1 + k % 3))
            out.append(GenerationRequest(prompt=PROMPT, width=64, height=64, num_inference_steps=2, guidance_scale=3.5,
                                         seed=i, loras=chosen if (i + offset) % 4 else ()))
        return out

    async def run(batch: list[GenerationRequest]) -> None:
        async def one(request):
            embedding = encoder.encode([request.prompt])[0]
            state = start_state(request, scheduler_config, embedding.prompt_embeds, embedding.pooled, CPU, torch.float32)
            state.adapter = await residency.acquire(request.loras)
            try:
                await engine.submit(state, mode="regular")
            finally:
                residency.release(state.adapter)

        await asyncio.gather(*(one(r) for r in batch))

    for size in (1, 2):  # warm-up: each forward size, with and without adapters
        asyncio.run(run(requests(size, 1)))
        asyncio.run(run([GenerationRequest(prompt=PROMPT, width=64, height=64, num_inference_steps=1,
                                           guidance_scale=3.5, seed=s) for s in range(size)]))
    warm = counters["stats"]["unique_graphs"]
    for start in range(0, 20, 2):  # 20 requests, 2 at a time: adapters, ranks and scales change every time
        asyncio.run(run(requests(2, start + 2)))
    assert counters["stats"]["unique_graphs"] == warm
    assert residency.stats["device_miss"] > 3  # adapters really changed (slots were rewritten)


def test_a_full_device_tier_makes_requests_wait_then_reuses_slots(tiny_model_dir, lora_files):
    transformer = SRPOPipeline(tiny_model_dir, None, CPU, torch.float32).transformer
    _, bank, residency = _engine_parts(tiny_model_dir, transformer, slots=2)  # one usable slot

    async def scenario() -> list[str]:
        events = []
        first = await residency.acquire((ref(lora_files["kohya"]),))
        waiting = asyncio.ensure_future(residency.acquire((ref(lora_files["xlabs"]),)))
        await asyncio.sleep(0)  # let it find no free slot
        assert not waiting.done()
        events.append("waiting")
        residency.release(first)
        second = await asyncio.wait_for(waiting, timeout=10)
        events.append("loaded")
        assert second == first  # the only slot, reused
        residency.release(second)
        again = await residency.acquire((ref(lora_files["xlabs"]),))  # resident now: a device hit
        residency.release(again)
        return events

    assert asyncio.run(scenario()) == ["waiting", "loaded"]
    assert residency.stats["device_hit"] == 1 and residency.stats["device_miss"] == 2
    assert residency.stats["host_miss"] == 2


def test_bank_adds_nothing_for_samples_without_adapters(tiny_model_dir, lora_files):
    transformer = SRPOPipeline(tiny_model_dir, None, CPU, torch.float32).transformer
    bank = LoraBank(transformer, slots=2, max_rank=8)
    delta = {"x_embedder": LowRank(torch.randn(4, 64), torch.randn(16, 4))}
    bank.write(1, delta)
    x = torch.randn(3, 10, 64)
    base = transformer.x_embedder(x)
    with bank.active([1, NO_ADAPTER, 1]):
        adapted = transformer.x_embedder(x)
    torch.testing.assert_close(adapted[1], base[1], rtol=0, atol=0)
    torch.testing.assert_close(adapted[0], base[0] + x[0] @ delta["x_embedder"].down.T @ delta["x_embedder"].up.T)
    with bank.active([NO_ADAPTER] * 3):
        assert bank.index is None  # no adapter in the batch: the module's own path


def test_concurrent_requests_for_one_url_fetch_it_once_into_the_capped_disk_cache(tmp_path, lora_files):
    """The disk tier (server/lora_sources.py): five requests at once for one URL make one download;
    files past the cache's byte cap go, least recently used first."""
    import http.server
    import threading

    from server.lora_sources import LoraSources
    from settings import Settings

    gets = []

    class Counting(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(lora_files["kohya"].parent), **kwargs)

        def do_GET(self):
            gets.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    size = lora_files["kohya"].stat().st_size
    settings = Settings(lora_cache_dir=tmp_path / "cache", lora_url_allowed_networks=["127.0.0.1/32"],
                        lora_disk_cache_bytes=int(2.5 * size))
    sources = LoraSources(settings)

    async def scenario() -> list[Path]:
        return await asyncio.gather(*(sources.local_file(f"{base}/kohya.safetensors") for _ in range(5)))

    try:
        files = asyncio.run(scenario())
        assert len(set(files)) == 1 and gets == ["/kohya.safetensors"]
        for name in ("xlabs", "diffusers", "rank8"):  # three more files: the cap holds two
            asyncio.run(sources.local_file(f"{base}/{name}.safetensors"))
        cached = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
        assert len(cached) <= 2 and files[0].name not in cached  # the least recently used went first
    finally:
        server.shutdown()
