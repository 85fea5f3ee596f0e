"""Loading components from a FLUX.1-dev folder in diffusers layout. Nothing is ever fetched."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from models.tiny import ensure_tiny_model
from models.transformer_file import load_transformer_file

logger = logging.getLogger(__name__)

# What each component needs inside the model folder.
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "model_index.json": (),
    "scheduler": ("scheduler_config.json",),
    "tokenizer": ("tokenizer_config.json",),
    "tokenizer_2": ("tokenizer_config.json",),
    "text_encoder": ("config.json",),
    "text_encoder_2": ("config.json",),
    "transformer": ("config.json",),
    "vae": ("config.json",),
}
COMPONENT_WEIGHTS = ("text_encoder", "text_encoder_2", "transformer", "vae")


class ModelFolderError(FileNotFoundError):
    """The model folder is missing or lacks parts; the message names every missing part."""


@dataclass(frozen=True)
class ModelPaths:
    model_dir: Path
    safety_dir: Path
    transformer_file: Path | None
    is_tiny: bool


def resolve_model_paths(
    model_dir: Path | None, safety_dir: Path | None, transformer_file: Path | None, tiny_dir: Path
) -> ModelPaths:
    """Where the weights come from: the configured folder, or the tiny preset (under `tiny_dir`) when none is set."""
    if model_dir is None:
        tiny_model_dir, tiny_safety_dir = ensure_tiny_model(tiny_dir)
        logger.warning(
            "SRPO_MODEL_DIR is not set: serving the TINY RANDOM preset from %s. Images will be noise. "
            "Set SRPO_MODEL_DIR to a FLUX.1-dev folder (and SRPO_TRANSFORMER_FILE to the SRPO weights).",
            tiny_model_dir,
        )
        return ModelPaths(tiny_model_dir, safety_dir or tiny_safety_dir, transformer_file, True)
    if safety_dir is None:
        raise ModelFolderError("SRPO_SAFETY_DIR must name the safety checker folder when SRPO_MODEL_DIR is set")
    return ModelPaths(model_dir, safety_dir, transformer_file, False)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def check_model_folder(folder: Path, components: tuple[str, ...] | None = None, *, transformer_file: Path | None = None) -> None:
    """Raise ModelFolderError naming everything the listed components need that is not there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    missing: list[str] = []
    for name, files in REQUIRED_FILES.items():
        if components is not None and name not in components and name != "model_index.json":
            continue
        path = folder / name
        if not files:
            if not path.exists():
                missing.append(name)
            continue
        missing += [f"{name}/{f}" for f in files if not (path / f).exists()]
        if name in COMPONENT_WEIGHTS and path.is_dir() and not _has_weights(path):
            if not (name == "transformer" and transformer_file is not None):
                missing.append(f"{name}/*.safetensors")
    if transformer_file is not None and (components is None or "transformer" in components):
        if not Path(transformer_file).is_file():
            missing.append(f"transformer file {transformer_file}")
    if missing:
        raise ModelFolderError(f"model folder {folder} is incomplete; missing: {', '.join(missing)}")


def load_scheduler_config(folder: Path) -> dict[str, Any]:
    check_model_folder(folder, ("scheduler",))
    return json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())


def load_text_encoders(
    folder: Path, device: torch.device, dtype: torch.dtype
) -> tuple[CLIPTokenizer, CLIPTextModel, T5TokenizerFast, T5EncoderModel]:
    check_model_folder(folder, ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"))
    kw = {"local_files_only": True}
    clip_tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw)
    t5_tok = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2", **kw)
    clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, **kw).to(device).eval()
    t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", dtype=dtype, **kw).to(device).eval()
    return clip_tok, clip, t5_tok, t5


def load_transformer(
    folder: Path, device: torch.device, dtype: torch.dtype, transformer_file: Path | None = None
) -> FluxTransformer2DModel:
    """The folder's transformer, or its config filled from `transformer_file` (SRPO's checkpoint)."""
    check_model_folder(folder, ("transformer",), transformer_file=transformer_file)
    if transformer_file is None:
        model = FluxTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", torch_dtype=dtype, local_files_only=True
        )
        return model.to(device).eval()
    return load_transformer_file(Path(folder) / "transformer", Path(transformer_file), device, dtype).eval()


def load_vae(folder: Path, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    check_model_folder(folder, ("vae",))
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    return vae.to(device).eval()
