"""The application builder named by serve_config.yaml (`import_path: deployments.app:build_app`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from ray.serve import Application

from deployments.decoder import Decoder
from deployments.denoiser import Denoiser
from deployments.ingress import Ingress
from deployments.text_encoder import TextEncoder
from models.acceleration import MODES, WARMUP_BATCH_SIZES, WARMUP_SIZES


class AppArgs(BaseModel):
    """`args:` of the application in a Serve config."""

    text_batch_size: int = Field(8, ge=1)
    text_batch_wait_s: float = Field(0.01, ge=0)
    prompt_cache_size: int = Field(512, ge=0)
    decode_batch_size: int = Field(4, ge=1)
    decode_batch_wait_s: float = Field(0.01, ge=0)
    denoise_max_batch_tokens: int = Field(
        16384, ge=1, description="Tokens (image + 512 text per sample) in one transformer forward."
    )
    denoise_acceleration_modes: list[Literal["none", "regular", "high"]] = Field(
        default_factory=lambda: list(MODES),
        description="Modes the Denoiser builds; a request for another falls back (and its logs say so).",
    )
    denoise_warmup_sizes: list[tuple[int, int]] = Field(
        default_factory=lambda: list(WARMUP_SIZES),
        description="(width, height) the compiled modes are compiled and warmed up for before ready.",
    )
    denoise_warmup_batch_sizes: list[int] = Field(default_factory=lambda: list(WARMUP_BATCH_SIZES))
    denoise_compile_cache_dir: str | None = Field(
        None, description="Persistent inductor cache; TORCHINDUCTOR_CACHE_DIR wins when set."
    )
    denoise_policy: Literal["cost", "cobatch", "fcfs", "request"] = Field(
        "cost", description="The Denoiser's scheduling policy (scheduling/policy.py); the others are for comparison."
    )
    deployment_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-deployment .options() overrides (tests, scripted deploys)."
    )


def build_app(args: AppArgs | dict[str, Any] | None = None) -> Application:
    args = AppArgs.model_validate(args or {})

    def opts(deployment):
        return deployment.options(**args.deployment_options.get(deployment.name, {}))

    return opts(Ingress).bind(
        opts(TextEncoder).bind(args.text_batch_size, args.text_batch_wait_s, args.prompt_cache_size),
        opts(Denoiser).bind(
            args.denoise_max_batch_tokens,
            args.denoise_acceleration_modes,
            args.denoise_warmup_sizes,
            args.denoise_warmup_batch_sizes,
            args.denoise_compile_cache_dir,
            args.denoise_policy,
        ),
        opts(Decoder).bind(args.decode_batch_size, args.decode_batch_wait_s),
    )
