"""Loading real-layout folders: SRPO's separate transformer file, its bf16 conversion, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from models.bfl_layout import diffusers_names, diffusers_parts
from models.loading import ModelFolderError, check_model_folder, load_transformer
from models.pipeline import SRPOPipeline
from models.request import GenerationRequest
from models.shapes import FLUX_DEV_TRANSFORMER
from models.transformer_file import convert_transformer_file, load_transformer_file
from tests.bfl_checkpoint import bfl_checkpoint
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


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfyui"])
def test_bfl_and_comfyui_checkpoints_load_exactly(tiny_model_dir, tmp_path, prefix):
    """The tiny transformer (two double, three single blocks, so that block indices matter; every
    parameter random, norms included) written in BFL's / ComfyUI's layout loads to the same
    parameters and the same forward."""
    config = {**json.loads((tiny_model_dir / "transformer" / "config.json").read_text()),
              "num_layers": 2, "num_single_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    original = FluxTransformer2DModel.from_config(config).eval()
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.normal_()
    checkpoint = {prefix + k: v.contiguous() for k, v in bfl_checkpoint(original.state_dict(), 2, 3).items()}
    if prefix:  # ComfyUI's all-in-one files carry the other components beside the transformer
        checkpoint["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    save_file(checkpoint, tmp_path / "flux.safetensors")
    loaded = load_transformer_file(tmp_path, tmp_path / "flux.safetensors", CPU, torch.float32).eval()
    expected = original.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    generator = torch.Generator().manual_seed(1)
    tokens, text = 12, 5
    inputs = dict(
        hidden_states=torch.randn(2, tokens, config["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(2, text, config["joint_attention_dim"], generator=generator),
        pooled_projections=torch.randn(2, config["pooled_projection_dim"], generator=generator),
        timestep=torch.tensor([0.3, 0.8]),
        guidance=torch.tensor([3.5, 2.0]),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"),
                            -1).reshape(tokens, 3),
        txt_ids=torch.zeros(text, 3),
    )
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, original(**inputs).sample)


def test_bfl_maps_agree_with_diffusers_converter_at_flux_width():
    """At FLUX.1-dev's real sizes, where diffusers' converter works, it inverts the test's BFL map, and
    so does the loader's. The converter cuts along dim 0 only, so one column per tensor suffices."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape[0], *([1] if len(shape) > 1 else []), generator=generator)
             for k, shape in shapes.items()}
    bfl = bfl_checkpoint(state, FLUX_DEV_TRANSFORMER["num_layers"], FLUX_DEV_TRANSFORMER["num_single_layers"])
    reference = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    width = FLUX_DEV_TRANSFORMER["num_attention_heads"] * FLUX_DEV_TRANSFORMER["attention_head_dim"]
    ours = {name: part for key, tensor in bfl.items()
            for name, part in zip(diffusers_names(key), diffusers_parts(key, tensor, width))}
    for converted in (reference, ours):
        assert set(converted) == set(state)
        assert [k for k in state if not torch.equal(converted[k], state[k])] == []
