"""Loading real-layout folders: SRPO's separate transformer file, its bf16 conversion, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from models.loading import ModelFolderError, check_model_folder, load_transformer
from models.pipeline import SRPOPipeline
from models.request import GenerationRequest
from models.transformer_file import convert_transformer_file
from tests.conftest import CPU

REQUEST = GenerationRequest(prompt="a boat", width=256, height=128, num_inference_steps=3, guidance_scale=3.0, seed=4)


@pytest.fixture(scope="module")
def split_folder(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny folder whose transformer has only its config, plus an fp32 SRPO-style file."""
    root = tmp_path_factory.mktemp("split")
    folder = shutil.copytree(tiny_model_dir, root / "flux-dev")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = {k: v.float().contiguous() for k, v in load_file(weights).items()}
    weights.unlink()
    srpo = root / "srpo_fp32.safetensors"
    save_file(state, srpo)
    return folder, srpo


def test_separate_transformer_file_gives_the_same_images(tiny_model_dir, split_folder):
    folder, srpo = split_folder
    merged = SRPOPipeline(tiny_model_dir, None, CPU, torch.float32).generate(REQUEST, False)
    split = SRPOPipeline(folder, None, CPU, torch.float32, transformer_file=srpo).generate(REQUEST, False)
    assert all(np.array_equal(a, b) for a, b in zip(merged.images, split.images))


def test_bf16_conversion_loads_and_keeps_the_weights(split_folder, tmp_path):
    folder, srpo = split_folder
    converted = convert_transformer_file(srpo, tmp_path / "srpo_bf16.safetensors")
    assert converted.stat().st_size < srpo.stat().st_size * 0.6
    original = load_file(srpo)
    model = load_transformer(folder, CPU, torch.bfloat16, transformer_file=converted)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, original[name].to(torch.bfloat16)), name
    images = SRPOPipeline(folder, None, CPU, torch.float32, transformer_file=converted).generate(REQUEST, False)
    assert images.images[0].shape == (128, 256, 3)


def test_transformer_file_with_wrong_keys_is_refused(split_folder, tmp_path):
    folder, _ = split_folder
    bad = tmp_path / "bad.safetensors"
    save_file({"not.a.flux.key": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="does not match the transformer config"):
        load_transformer(folder, CPU, torch.float32, transformer_file=bad)


def test_incomplete_folder_names_everything_missing(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    shutil.rmtree(folder / "vae")
    (folder / "tokenizer_2" / "tokenizer_config.json").unlink()
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError) as err:
        check_model_folder(folder)
    message = str(err.value)
    for part in ("vae/config.json", "tokenizer_2/tokenizer_config.json", "transformer/*.safetensors"):
        assert part in message
    with pytest.raises(ModelFolderError, match="does not exist"):
        check_model_folder(tmp_path / "nowhere")
    with pytest.raises(ModelFolderError, match="missing"):
        SRPOPipeline(folder, None, CPU, torch.float32)


def test_fp8_stored_transformer_file_is_refused_not_upcast(split_folder, tmp_path):
    folder, srpo = split_folder
    fp8 = tmp_path / "srpo_fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in load_file(srpo).items()}, fp8)
    with pytest.raises(ValueError, match=r"stores its weights in fp8 \(F8_E4M3\); refused"):
        load_transformer(folder, CPU, torch.bfloat16, transformer_file=fp8)


# Loads `weights` into bf16 and reports the process's anonymous memory (what a second copy of the weights
# would take; the memory-mapped file's pages are the page cache's, not the process's) before and at its peak.
_MEASURE = r"""
import json, sys, threading
from pathlib import Path
import torch
from models.transformer_file import load_transformer_file

def anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

peak, done = [anon()], threading.Event()
def sample() -> None:
    while not done.wait(0.002):
        peak.append(max(peak.pop(), anon()))
baseline = peak[0]
sampler = threading.Thread(target=sample)
sampler.start()
model = load_transformer_file(Path(sys.argv[1]), Path(sys.argv[2]), torch.device("cpu"), torch.bfloat16)
done.set()
sampler.join()
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"grew": max(peak[0], anon()) - baseline, "model": size}))
"""


def test_a_large_fp32_file_loads_into_bf16_without_a_second_copy_in_memory(tmp_path):
    """A few-hundred-MB fp32 file (the README's claim for SRPO's 47.6 GB one): loading it into bf16 in a fresh
    process grows that process's memory by the bf16 model and a few tensors, not by the fp32 state dict."""
    with torch.device("meta"):  # 78M parameters: 312 MB in fp32
        shapes = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
            num_attention_heads=6, joint_attention_dim=768, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    shapes.save_config(tmp_path / "transformer")
    state = {key: torch.full(t.shape, 0.5) for key, t in shapes.state_dict().items()}
    fp32_bytes, largest = sum(t.nbytes for t in state.values()), max(t.nbytes for t in state.values())
    save_file(state, tmp_path / "fp32.safetensors")
    del state
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "transformer"),
                          str(tmp_path / "fp32.safetensors")],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.splitlines()[-1])
    assert measured["model"] * 2 == fp32_bytes
    # Streaming: the bf16 model plus one fp32 tensor and its cast in flight; all at once would add fp32_bytes.
    bound = measured["model"] + 2 * largest + 64 * 2**20
    assert measured["grew"] < bound, (measured, {"fp32_bytes": fp32_bytes, "bound": bound})
