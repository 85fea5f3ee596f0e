"""The one configuration object of the project, read from `SRPO_*` environment variables."""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from api.schemas import DEFAULT_MAX_PIXELS

DTypeName = Literal["float32", "bfloat16", "float16"]
ENV_PREFIX = "SRPO_"


def _list_from_env(value: Any) -> Any:
    """A list setting as JSON (`["a", "b"]`) or as the comma-separated form people type (`a,b`)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return _json(text)
    return [part.strip() for part in text.split(",") if part.strip()]


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PydanticCustomError("json", "not valid JSON ({why} at character {pos})",
                                  {"why": exc.msg, "pos": exc.pos}) from None


def _json_from_env(value: Any) -> Any:
    return _json(value) if isinstance(value, str) else value


def _networks(values: list[str]) -> list[str]:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise PydanticCustomError("network", "{value} is not a network (an address or address/prefix)",
                                      {"value": repr(value)}) from None
    return values


# Decoded here rather than by pydantic-settings, whose JSON-only parsing of a plain value fails with
# an error that names no variable.
EnvList = Annotated[list[str], NoDecode, BeforeValidator(_list_from_env)]
EnvNetworks = Annotated[EnvList, AfterValidator(_networks)]
EnvJson = Annotated[dict[str, Any], NoDecode, BeforeValidator(_json_from_env)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SRPO_", env_file=None, extra="ignore")

    # --- weights ---
    model_dir: Path | None = Field(
        None, description="FLUX.1-dev folder in diffusers layout; unset = the tiny offline preset (noise images)."
    )
    transformer_file: Path | None = Field(
        None, description="SRPO transformer safetensors (diffusers key names) replacing the folder's transformer."
    )
    safety_dir: Path | None = Field(None, description="Safety checker folder; unset = the tiny preset's checker.")
    tiny_dir: Path = Field(
        Path.home() / ".cache" / "srpo-serve" / "tiny", description="Where the tiny preset is generated."
    )
    device: str = Field("auto", description="'auto' picks cuda when available, else cpu.")
    dtype: DTypeName | None = Field(None, description="Serving dtype; default bfloat16 on GPU, float32 on CPU.")

    # --- request limits ---
    max_body_bytes: int = Field(
        36 * 1024 * 1024, ge=1024, description="Largest request body: 413 beyond it, before any work. The default "
        "fits the largest image_url data URI (image_fetch_max_bytes, base64-encoded) plus the other fields.",
    )
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, description="Largest width*height accepted for one image.")
    image_fetch_timeout_s: float = 10.0
    image_fetch_max_bytes: int = 25 * 1024 * 1024
    image_max_source_pixels: int = 50_000_000
    image_url_allowed_networks: EnvNetworks = Field(
        default_factory=list, examples=["127.0.0.1/32,10.0.0.0/8"],
        description="Non-public networks image_url may reach anyway, e.g. 127.0.0.1/32,10.0.0.0/8 "
        '(comma-separated, or a JSON list such as ["127.0.0.1/32"]).',
    )

    # --- outputs ---
    storage_dir: Path = Field(Path("outputs"), description="Local folder for outputs and queue payloads.")
    storage_url: str | None = Field(
        None, description="fsspec URL that replaces storage_dir, e.g. s3://bucket/prefix (needs s3fs: '.[s3]')."
    )
    storage_options: EnvJson = Field(
        default_factory=dict, examples=['{"endpoint_url": "http://minio:9000"}'],
        description='fsspec options for storage_url (JSON), e.g. {"endpoint_url": "http://minio:9000"}; '
        "credentials come from the usual AWS_* variables or workload identity.",
    )
    storage_public_base_url: str | None = Field(
        None, description="Public/CDN base serving storage_url's root (outputs at <base>/files/<name>); "
        "unset = time-limited presigned URLs.",
    )
    storage_presign_ttl_s: float = Field(3600.0, gt=0, description="Longest validity of a presigned output URL.")
    output_ttl_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="How long outputs are kept, unless a request asks otherwise "
        "(x-fal-object-lifecycle-preference).",
    )
    storage_max_bytes: int | None = Field(
        20 * 1024**3, ge=0, description="Local storage only: past this size the oldest outputs are removed early.",
    )
    storage_sweep_interval_s: float = Field(60.0, gt=0, description="How often expired outputs and payloads go.")
    payload_inline_max_bytes: int = Field(
        4096, ge=0, description="Queue inputs and results larger than this live in storage, not in the record.",
    )
    public_base_url: str | None = Field(
        None, description="Base for /files URLs in responses; unset = the scheme and host the client used."
    )

    # --- queue (fal's /queue routes) ---
    redis_url: str | None = Field(
        None, description="Request store shared by all ingress replicas, e.g. redis://host:6379/1; unset = embedded."
    )
    queue_db_path: Path = Field(
        Path("state/requests.sqlite3"), description="Embedded request store (SQLite); shared by replicas on one node."
    )
    result_ttl_s: float = Field(3600.0, gt=0, description="How long a finished request stays readable.")
    queue_max_pending: int = Field(1000, ge=1, description="Submits beyond this many waiting requests get 429.")
    queue_concurrency: int = Field(8, ge=1, description="Queued requests one ingress replica runs at once.")
    queue_lease_s: float = Field(
        30.0, gt=0, description="A running request whose replica stops renewing this long goes back to the queue."
    )
    sync_max_concurrency: int = Field(32, ge=1, description="Synchronous runs per ingress replica before 429.")
    queue_low_priority_max_wait_s: float = Field(
        300.0, ge=0, description="A low-priority request (X-Fal-Queue-Priority: low) that waited this long starts "
        "before normal ones submitted after it: low never starves.",
    )
    queue_max_attempts: int = Field(
        3, ge=1, description="A queued request whose replica stopped this many times ends with an error."
    )
    queue_status_hold_s: float = Field(
        1.0, ge=0, le=30,
        description="A status poll repeated within a second whose answer has not changed is held up to this long "
                    "for a change (a long poll: fal's Python client polls every 0.1 s); 0 answers at once.",
    )
    ingress_gc_threshold: int = Field(
        10_000, ge=700,
        description="Allocations between the ingress replica's youngest garbage collections (Python's default: 700). "
                    "Hundreds of held status polls keep ~100k objects young: at 700, full collections of 10-45 ms "
                    "ran three times a second under load (docs/benchmarks.md, issue 25).",
    )
    queue_drain_s: float = Field(
        15.0, ge=0, description="A stopping ingress replica's time to finish queued work before handing it back; "
        "it begins after Serve's own drain (30 s behind HAProxy), and the Ingress's graceful_shutdown_timeout_s "
        "(60 s) must cover both.",
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="Longest run of one request (all attempts); past it: 504 request_timeout.",
    )
    retry_max_attempts: int = Field(
        3, ge=1, description="Runs of one request when a model replica dies or cannot be reached; "
        "never for input errors, and 1 with the x-fal-no-retry header.",
    )
    webhook_timeout_s: float = 10.0
    webhook_attempts: int = Field(3, ge=1)
    webhook_allowed_networks: EnvNetworks = Field(
        default_factory=list, examples=["10.0.0.0/8"],
        description="Non-public networks fal_webhook may reach anyway (comma-separated or a JSON list).",
    )

    # --- LoRAs (per request: the `loras` field) ---
    lora_dir: Path | None = Field(
        None, description="Folder of .safetensors LoRAs a request may name by file name (with or without the suffix)."
    )
    lora_cache_dir: Path = Field(
        Path.home() / ".cache" / "srpo-serve" / "loras",
        description="Node-local disk cache of fetched LoRA files (put it on a shared volume to fetch once per cluster).",
    )
    lora_disk_cache_bytes: int = Field(50 * 1024**3, ge=0, description="Disk cache size; least recently used go first.")
    lora_host_cache_bytes: int = Field(
        8 * 1024**3, ge=0, description="Parsed LoRAs kept in a replica's host memory; least recently used go first."
    )
    lora_device_slots: int = Field(
        4, ge=1, description="LoRA sets resident on a Denoiser's GPU at once (each costs lora_max_rank-sized pools).",
    )
    lora_max_rank: int = Field(
        128, ge=1, description="Largest combined rank of one request's LoRAs (their ranks add up); also the padded "
        "rank of the device pools, so it sets their memory.",
    )
    lora_max_per_request: int = Field(4, ge=1, description="LoRAs one request may apply.")
    lora_max_file_bytes: int = Field(2 * 1024**3, ge=1, description="Largest LoRA file fetched or read.")
    lora_max_abs_scale: float = Field(4.0, gt=0, description="Largest |scale| of a LoRA.")
    lora_fetch_timeout_s: float = Field(120.0, gt=0, description="Longest download of one LoRA file.")
    lora_url_allowed_networks: EnvNetworks = Field(
        default_factory=list, description="Non-public networks a LoRA URL may reach anyway (comma-separated or JSON list)."
    )

    cost_profile: Path | None = Field(
        None, description="Step-time profile the Denoiser's scheduler plans with (scheduling/cost_model.py); "
        "default: the shipped one for the device (scheduling/profiles/h100.json on CUDA, cpu-tiny.json on CPU).",
    )

    attention_backend: str = Field(
        "auto", description="The transformer's attention kernel (models/attention.py): auto = SDPA's flash kernel "
        "on a GPU in bf16/fp16, PyTorch's SDPA elsewhere; or one of diffusers' backend names (e.g. native, flash).",
    )
    compile_on_cpu: bool = Field(
        False, description="Let `regular` compile on a CPU (inductor's C++ backend; minutes of warm-up): tests "
        "of the compiled path without a GPU. Off: `regular` falls back to `none` on a CPU.",
    )

    fault_injection: bool = Field(
        False, description="Chaos tests only: lets a stage's inject_fault() make its replica fail health checks."
    )

    # --- access ---
    api_keys: EnvList = Field(
        default_factory=list, examples=["key1,key2"],
        description="Accepted `Authorization: Key <key>` values (comma-separated or a JSON list); empty = open.",
    )

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return getattr(torch, self.dtype)
        return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def settings_problems() -> list[str]:
    """One line per `SRPO_*` variable of this process that Settings refuses: the variable, what was
    given, why, and an example of what it takes. Empty when every setting is valid."""
    try:
        Settings()
        return []
    except ValidationError as exc:
        return [_problem(error) for error in exc.errors()]


def _problem(error: Any) -> str:
    name = str(error["loc"][0]) if error["loc"] else ""
    variable = f"{ENV_PREFIX}{name.upper()}"
    given = next((v for k, v in os.environ.items() if k.upper() == variable), str(error.get("input")))
    field = Settings.model_fields.get(name)
    example = None
    if field is not None:
        example = field.examples[0] if field.examples else field.default
    hint = f"; for example {variable}={shlex.quote(str(example))}" if example not in (None, [], {}) else ""
    return f"{variable}={shlex.quote(given)}: {error['msg']}{hint}"
