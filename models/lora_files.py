"""LoRA files: a `.safetensors` LoRA in any layout people publish for FLUX, read as low-rank deltas.

Layouts: diffusers/PEFT (`transformer.<module>.lora_A.weight`), kohya / ai-toolkit (`lora_unet_*`,
`lora_te1_*`) and XLabs/BFL (`double_blocks.N.processor.*`). diffusers' own converters
(`FluxLoraLoaderMixin.lora_state_dict`) turn each into diffusers' module names; this module keeps
the result as one delta per targeted Linear, `delta_W = up @ down` with the LoRA's alpha / rank
already folded into `up`. Nothing here touches a model's weights: models/lora_layers.py applies
the deltas beside the base weights, unmerged.

Only safetensors are read (a pickle can run code); a file whose keys or shapes do not fit the model
is refused with the offending keys named.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
from diffusers.utils.state_dict_utils import StateDictType
from safetensors import SafetensorError, safe_open
from torch import nn

COMPONENTS = ("transformer", "text_encoder")  # FLUX LoRAs adapt the transformer and CLIP (never T5)
SHOWN_KEYS = 4  # offending keys quoted in an error


class LoraFormatError(ValueError):
    """The file is not a LoRA this model can use; the message says why, naming a few keys."""


@dataclass(frozen=True)
class LowRank:
    """One targeted Linear's delta: `up @ down`, scale included."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank), multiplied by alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA file's deltas per component ("transformer", "text_encoder") and module path."""

    parts: dict[str, dict[str, LowRank]]

    @property
    def nbytes(self) -> int:
        return sum(d.down.nbytes + d.up.nbytes for part in self.parts.values() for d in part.values())


def _shown(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    head = path.open("rb").read(9)
    if len(head) < 9 or head[8:9] != b"{":  # safetensors: 8-byte header length, then a JSON header
        kind = "a pickle" if head[:1] == b"\x80" or head[:2] == b"PK" else "not safetensors"
        raise LoraFormatError(f"the LoRA file is {kind}: only .safetensors LoRAs are loaded")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraFormatError(f"the LoRA file is not a readable safetensors file ({exc})") from exc


def _alphas(metadata: dict[str, str], network_alphas: dict[str, torch.Tensor]) -> dict[str, float]:
    """Module path (with its component prefix) -> alpha, from the file's alpha keys or PEFT metadata."""
    alphas = {key.removesuffix(".alpha").replace("text_encoder.text_model.", "text_encoder."): float(value)
              for key, value in network_alphas.items()}
    peft = json.loads(metadata.get("lora_adapter_metadata", "null") or "null")
    if isinstance(peft, dict) and not alphas:
        default = peft.get("lora_alpha")
        for module, alpha in (peft.get("alpha_pattern") or {}).items():
            alphas[module] = float(alpha)
        if default is not None:
            alphas["*"] = float(default)
    return alphas


def _text_encoder_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP part in PEFT names, as diffusers converts it when it loads a text encoder LoRA (older
    layouts name it `...to_k_lora.down.weight`); without the `text_model.` level, which CLIPTextModel
    no longer has."""
    part = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    if not part:
        return {}
    if not any(".lora_A." in k for k in part):  # already PEFT names: nothing to convert
        kind = StateDictType.DIFFUSERS_OLD if any("_lora." in k for k in part) else None
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part, original_type=kind))
    return {"text_encoder." + k.removeprefix("text_model."): v for k, v in part.items()}


def read_lora(path: Path) -> LoraWeights:
    """The deltas of a LoRA file, converted to diffusers' module names; LoraFormatError if it is not one."""
    tensors, metadata = _read_safetensors(Path(path))
    if not tensors:
        raise LoraFormatError("the LoRA file holds no tensors")
    if bad := sorted(k for k, v in tensors.items() if not v.is_floating_point() and v.dim() > 0):
        raise LoraFormatError(f"the LoRA file has non-float tensors: {_shown(bad)}")
    if dora := sorted(k for k in tensors if "dora_scale" in k or "lora_magnitude_vector" in k):
        raise LoraFormatError(f"DoRA LoRAs are not supported: {_shown(dora)}")
    try:
        state, network_alphas = FluxPipeline.lora_state_dict(tensors, return_alphas=True)
        alphas = _alphas(metadata, network_alphas or {})
        state = {**{k: v for k, v in state.items() if not k.startswith("text_encoder.")}, **_text_encoder_part(state)}
    except (ValueError, KeyError, AssertionError, RuntimeError) as exc:
        raise LoraFormatError(f"the LoRA's keys are in no FLUX layout this server reads ({exc})") from exc
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.endswith(".lora_A.weight"):
            downs[key.removesuffix(".lora_A.weight")] = value
        elif key.endswith(".lora_B.weight"):
            ups[key.removesuffix(".lora_B.weight")] = value
        else:
            unknown.append(key)
    unknown += [f"{m}.lora_A.weight" for m in downs.keys() ^ ups.keys() if m in downs]
    unknown += [f"{m}.lora_B.weight" for m in downs.keys() ^ ups.keys() if m in ups]
    if unknown:
        raise LoraFormatError(f"the LoRA has keys that are not LoRA pairs for FLUX: {_shown(sorted(unknown))}")
    parts: dict[str, dict[str, LowRank]] = {}
    for module in sorted(downs):
        component, _, path_in = module.partition(".")
        if component not in COMPONENTS:
            raise LoraFormatError(f"the LoRA adapts parts of no FLUX component: {_shown([module])}")
        down, up = downs[module].float(), ups[module].float()
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoraFormatError(f"the LoRA's pair for {module} is not a Linear's low-rank pair "
                                  f"(down {tuple(down.shape)}, up {tuple(up.shape)})")
        rank = down.shape[0]
        alpha = alphas.get(module, alphas.get(path_in, alphas.get("*", float(rank))))
        if not math.isfinite(alpha):
            raise LoraFormatError(f"the LoRA's alpha for {module} is not finite")
        parts.setdefault(component, {})[path_in] = LowRank(down.contiguous(), (up * (alpha / rank)).contiguous())
    if not all(torch.isfinite(d.up).all() and torch.isfinite(d.down).all() for p in parts.values() for d in p.values()):
        raise LoraFormatError("the LoRA's weights are not finite")
    return LoraWeights(parts)


def linear_shapes(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear of `module` by path: (in_features, out_features), the shapes a LoRA must fit."""
    return {name: (m.in_features, m.out_features) for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def check_fits(weights: LoraWeights, component: str, shapes: dict[str, tuple[int, int]]) -> None:
    """LoraFormatError naming the keys of `component` that target no Linear of the model, or the wrong shape."""
    missing, wrong = [], []
    for path, delta in weights.parts.get(component, {}).items():
        if path not in shapes:
            missing.append(f"{component}.{path}")
        elif (delta.down.shape[1], delta.up.shape[0]) != shapes[path]:
            wrong.append(f"{component}.{path} ({delta.down.shape[1]}->{delta.up.shape[0]}, "
                         f"the model's is {shapes[path][0]}->{shapes[path][1]})")
    if missing:
        raise LoraFormatError(f"the LoRA targets modules this model does not have (is it for another model?): "
                              f"{_shown(sorted(missing))}")
    if wrong:
        raise LoraFormatError(f"the LoRA's shapes do not fit this model (is it for another model?): {_shown(sorted(wrong))}")


def combine(loras: list[tuple[LoraWeights, float]], component: str) -> dict[str, LowRank]:
    """One adapter equal to the sum of `scale * delta` of each LoRA: downs stacked along the rank,
    scaled ups side by side (what diffusers' set_adapters(names, weights) computes, as one product)."""
    paths = sorted({p for weights, _ in loras for p in weights.parts.get(component, {})})
    combined = {}
    for path in paths:
        pairs = [(w.parts[component][path], s) for w, s in loras if path in w.parts.get(component, {})]
        combined[path] = LowRank(torch.cat([d.down for d, _ in pairs]), torch.cat([d.up * s for d, s in pairs], dim=1))
    return combined
