"""Every benchmark script runs end to end in a tiny CPU mode, so none of them can rot; the random
FLUX.1-dev-shaped models they use on a GPU are checked here on the meta device."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from benchmarks import end_to_end, front_door, load_test, quality, random_model, report, serving_overhead, step_latency
from models.pipeline import SRPOPipeline
from models.request import GenerationRequest
from scheduling.policy import POLICIES
from tests.conftest import CPU
from tests.harness import running_serve, tiny_env

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def read_result(out: Path, name: str) -> dict:
    result = json.loads((out / f"{name}.cpu-tiny.json").read_text())
    assert result["kind"] == "cpu-tiny"
    assert result["command"].startswith(f".venv/bin/python -m benchmarks.{name} --tiny")
    return result


def test_engine_level_scripts_and_the_report(tmp_path):
    out = ["--tiny", "--out", str(tmp_path)]
    step_latency.main([*out, "--size", "128x128", "--batch-sizes", "1,2", "--repeats", "1", "--modes", "none,regular"])
    step_latency.main([*out, "--size", "128x128", "--modes", "none", "--budget-s", "-1"])
    assert "not reached within --budget-s" in read_result(tmp_path, "step_latency")["table"]
    step_latency.main([*out, "--size", "128x128", "--batch-sizes", "1,2", "--repeats", "1"])
    load_test.main([*out, "--mix", "128x128:2,192x128:3", "--requests", "4", "--loads", "0.8"])
    quality.main([*out, "--size", "128x128", "--steps", "3", "--samples", "2"])

    steps = read_result(tmp_path, "step_latency")
    assert [r["batch"] for r in steps["data"]["rows"]] == [1, 2] and "unavailable on cpu" in steps["table"]
    runs = read_result(tmp_path, "load_test")["data"]["runs"]
    assert [r["policy"] for r in runs] == list(POLICIES) and all(len(r["latencies"]) == 4 for r in runs)
    variants = read_result(tmp_path, "quality")["data"]["rows"]
    assert [v["variant"] for v in variants] == ["step cache only, threshold 0.08", "step cache only, threshold 0.16"]

    doc = tmp_path / "benchmarks.md"
    shutil.copy(DOC, doc)
    report.main(["--results", str(tmp_path), "--doc", str(doc)])
    text = doc.read_text()
    for name in ("step_latency", "load_test", "quality"):
        start, end = text.index(f"<!-- result:{name}:cpu-tiny -->"), text.index(f"<!-- /result:{name}:cpu-tiny -->")
        assert f"--out {tmp_path}" in text[start:end]  # the section now holds this run
        assert "owed: no GPU lent" in text[text.index(f"<!-- result:{name}:gpu -->"):]
    assert "## Serving overhead on CPU (tiny model)" in text


def test_http_scripts_against_one_tiny_server(tmp_path, tiny_root):
    with running_serve(tiny_env(tiny_root, tmp_path / "storage")) as base:
        end_to_end.main(["--tiny", "--out", str(tmp_path), "--size", "128x128", "--steps", "2", "--requests", "1",
                         "--warmup", "1", "--url", base])
        serving_overhead.main(["--requests", "2", "--concurrency", "2", "--url", base])
    http = read_result(tmp_path, "end_to_end")["data"]["http_s"]
    assert set(http) == {"none", "regular", "high"} and all(len(v) == 1 for v in http.values())


def test_one_gpu_serve_settings(tmp_path):
    args = argparse.Namespace(tiny=False, safety_dir=None, transformer_file=Path("/w/srpo.safetensors"),
                              modes="none,regular", warmup_sizes="1024x768,512x512", warmup_batches="1,2")
    env, app_args = end_to_end.serve_settings(args, Path("/w/flux"), tmp_path, torch.device("cuda"))
    assert env["SRPO_MODEL_DIR"] == "/w/flux" and env["SRPO_TRANSFORMER_FILE"] == "/w/srpo.safetensors"
    assert env["SRPO_DEVICE"] == "cuda" and env["SRPO_DTYPE"] == "bfloat16"
    gpus = [o["ray_actor_options"]["num_gpus"] for o in app_args["deployment_options"].values()]
    assert sum(gpus) == 1
    assert app_args["denoise_warmup_sizes"] == [(1024, 768), (512, 512)] and app_args["denoise_warmup_batch_sizes"] == [1, 2]
    assert app_args["denoise_acceleration_modes"] == ["none", "regular"]


@pytest.mark.parametrize("build, params", [
    (lambda: FluxTransformer2DModel(**random_model.FLUX_DEV_TRANSFORMER), 11_901_408_320),
    (lambda: AutoencoderKL(**random_model.FLUX_VAE), 83_819_683),
    (lambda: T5EncoderModel(T5Config(**random_model.T5_XXL, feed_forward_proj="gated-gelu",
                                     is_encoder_decoder=False)), 4_762_310_656),
    (lambda: CLIPTextModel(CLIPTextConfig(**random_model.CLIP_L)), 123_060_480),
])
def test_random_models_have_the_real_shapes(build, params):
    with torch.device("meta"):
        module = build()
    assert sum(p.numel() for p in module.parameters()) == params


def test_random_folder_loads_and_generates(tmp_path, tiny_model_dir, monkeypatch):
    """The folder writer at toy sizes: the app's loaders accept what it writes."""
    monkeypatch.setattr(random_model, "FLUX_DEV_TRANSFORMER", dict(
        random_model.FLUX_DEV_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)))
    monkeypatch.setattr(random_model, "FLUX_VAE", dict(
        random_model.FLUX_VAE, block_out_channels=(4, 8, 8, 8), layers_per_block=1, norm_num_groups=2))
    monkeypatch.setattr(random_model, "T5_XXL", dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    monkeypatch.setattr(random_model, "CLIP_L", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, projection_dim=32))
    folder = random_model.write_random_folder(tmp_path, tiny_model_dir, CPU, torch.float32)
    result = SRPOPipeline(folder, None, CPU, torch.float32).generate(
        GenerationRequest(prompt="noise", width=128, height=128, num_inference_steps=2, guidance_scale=3.5, seed=1),
        enable_safety_checker=False)
    assert result.images[0].shape == (128, 128, 3) and np.isfinite(result.latents.numpy()).all()


def test_front_door_runs_small(tmp_path, tiny_root, monkeypatch):
    """The front-door benchmark end to end on one store, a small queue and a few clients."""
    # The benchmark's own default (HAProxy in front), set here so that it ends with the test: set by
    # main() it stayed in this process, and every later module's Serve fixture ran behind HAProxy.
    monkeypatch.setenv("SRPO_HIGH_THROUGHPUT_INGRESS", "1")
    out = tmp_path / "front_door.json"
    front_door.main(["--seconds", "0.5", "--clients", "5", "--depths", "0,20", "--stores", "sqlite",
                     "--out", str(out)])
    result = json.loads(out.read_text())
    assert [row["depth"] for row in result["rows"]] == [0, 20]
    assert all(row["waiting_clients"]["errors"] == 0 and row["trivial"]["rps"] > 0 for row in result["rows"])
