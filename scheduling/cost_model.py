"""What one transformer forward costs, read from a measured profile (no torch, no Ray).

A profile lists step times per acceleration mode at measured points (image tokens per sample,
samples in the forward). Between and beyond them the model interpolates over one coordinate, the
forward's work w = samples * (L + L^2 / attention_tokens) with L = image tokens + 512 text tokens:
the matmuls grow with L, attention with L^2, and `attention_tokens` is the length at which the
two cost the same (~34k for FLUX.1-dev). Step time is piecewise linear in w through the points,
extended linearly past the ends, which keeps the fixed per-forward overhead the points show.
"""

from __future__ import annotations

import bisect
import json
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

TEXT_TOKENS = 512
PROFILES = Path(__file__).parent / "profiles"


class ProfilePoint(BaseModel):
    image_tokens: int = Field(gt=0)
    batch: int = Field(gt=0, description="samples in the forward")
    step_ms: float = Field(gt=0)
    source: Literal["measured", "fit"] = Field(
        "measured", description="'fit': not measured, read off the affine fit of the measured points"
    )


class Profile(BaseModel):
    device: str
    date: str
    command: str = Field(description="what produced the measured points")
    attention_tokens: float = Field(gt=0)
    request_overhead_ms: float = Field(0.0, ge=0, description="per request, outside the Denoiser (encode, decode)")
    part_overhead_ms: float = Field(
        20.0, ge=0, description="per extra Denoiser call when a request's samples are split (estimated, not measured)"
    )
    lora_step_fraction: float = Field(
        0.04, ge=0, description="a forward's extra time when its samples carry LoRAs (estimated from FLOPs at the "
                                "padded rank 64, not measured)"
    )
    lora_load_ms: float = Field(
        500.0, ge=0, description="making a LoRA set device-resident on a replica that lacks it (estimated)"
    )
    modes: dict[str, list[ProfilePoint]]
    notes: str = ""


def default_profile_path(device_type: str) -> Path:
    """The shipped profile for a device type: the H100 one for CUDA, the tiny model's for CPU."""
    return PROFILES / ("h100.json" if device_type == "cuda" else "cpu-tiny.json")


def work(image_tokens: int, samples: int, attention_tokens: float) -> float:
    length = image_tokens + TEXT_TOKENS
    return samples * (length + length * length / attention_tokens)


class _Curve:
    """Piecewise-linear step time over forward work, extended linearly past the end points."""

    def __init__(self, points: list[tuple[float, float]]) -> None:
        merged: dict[float, list[float]] = {}
        for w, ms in points:
            merged.setdefault(w, []).append(ms)
        self.w = sorted(merged)
        self.ms = [sum(merged[w]) / len(merged[w]) for w in self.w]

    def __call__(self, w: float) -> float:
        if len(self.w) == 1:  # one point: proportional
            return self.ms[0] * w / self.w[0]
        i = min(max(bisect.bisect_left(self.w, w), 1), len(self.w) - 1)
        (w0, m0), (w1, m1) = (self.w[i - 1], self.ms[i - 1]), (self.w[i], self.ms[i])
        return max(m0 + (m1 - m0) * (w - w0) / (w1 - w0), 0.05 * min(self.ms))


class CostModel:
    def __init__(self, profile: Profile) -> None:
        if "none" not in profile.modes:
            raise ValueError("a cost profile needs the 'none' mode")
        self.profile = profile
        self._step_s: dict[tuple[int, int, str], float] = {}

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls(Profile.model_validate(json.loads(Path(path).read_text())))


    @cached_property
    def _curves(self) -> dict[str, _Curve]:
        a = self.profile.attention_tokens
        return {
            mode: _Curve([(work(p.image_tokens, p.batch, a), p.step_ms) for p in points])
            for mode, points in self.profile.modes.items()
        }

    @property
    def request_overhead_s(self) -> float:
        return self.profile.request_overhead_ms / 1000

    @property
    def part_overhead_s(self) -> float:
        return self.profile.part_overhead_ms / 1000

    @property
    def lora_load_s(self) -> float:
        return self.profile.lora_load_ms / 1000

    def lora_factor(self, has_loras: bool) -> float:
        """How much longer a request's steps take when it carries LoRAs (unmerged, padded rank)."""
        return 1.0 + self.profile.lora_step_fraction if has_loras else 1.0

    def step_s(self, image_tokens: int, samples: int, mode: str = "none") -> float:
        """Seconds for one forward of `samples` samples of `image_tokens` each; unprofiled modes cost as 'none'."""
        key = (image_tokens, samples, mode)
        if (seconds := self._step_s.get(key)) is None:  # the policies ask for the same few shapes all the time
            curve = self._curves.get(mode, self._curves["none"])
            seconds = self._step_s[key] = curve(work(image_tokens, samples, self.profile.attention_tokens)) / 1000
        return seconds

