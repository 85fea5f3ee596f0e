"""The fal contract's data shapes for `fal-ai/flux/srpo` and `fal-ai/flux/srpo/image-to-image`.

Sizes: the model works on multiples of 16 pixels, so each side of a requested size is rounded
DOWN to a multiple of 16 (at least 16), as diffusers' Flux pipelines do; the response reports the
size produced. Each deployment caps the pixels of one image (`SRPO_MAX_PIXELS`); that limit is
checked by the service (server/service.py), not here, so these shapes hold no configuration.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from pydantic_core import ErrorDetails, PydanticCustomError

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MIN_SEED = -(2**63)
RANDOM_SEED_BOUND = 2**53  # random seeds stay exact in JavaScript numbers
REQUEST_ID_HEADER = "x-fal-request-id"
# JSON `{"expiration_duration_seconds": N}`: how long this request's output files are kept.
LIFECYCLE_HEADER = "x-fal-object-lifecycle-preference"
START_TIMEOUT_HEADER = "x-fal-request-timeout"  # seconds a request may wait before it starts
NO_RETRY_HEADER = "x-fal-no-retry"  # any true value: never run the request a second time
PRIORITY_HEADER = "x-fal-queue-priority"  # normal | low
RUNNER_HINT_HEADER = "x-fal-runner-hint"  # routing affinity; accepted, best effort
ERROR_TYPE_HEADER = "x-fal-error-type"  # on every failure, the body's error_type
DEFAULT_MAX_PIXELS = 1536 * 1536  # per image, unless a deployment sets another cap
# T5 reads 512 tokens and CLIP 77; far longer text is never read, so refuse it before tokenising.
MAX_PROMPT_CHARS = 10_000

ImageSizePreset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
PRESET_SIZES: dict[str, tuple[int, int]] = {  # (width, height)
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
OutputFormat = Literal["jpeg", "png"]
Acceleration = Literal["none", "regular", "high"]


def round_side(pixels: int) -> int:
    """A side length rounded down to the model's multiple of 16, never below 16."""
    return max(16, pixels // 16 * 16)


class ImageSize(BaseModel):
    width: int = Field(512, ge=1, le=14142, description="Width in pixels; rounded down to a multiple of 16.")
    height: int = Field(512, ge=1, le=14142, description="Height in pixels; rounded down to a multiple of 16.")


def _size_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "preset"
    return "custom" if isinstance(value, (dict, ImageSize)) else None


# A preset name or {width, height}, told apart by the input's type: a mistake in either gets that
# form's one error, not one from each member of the union.
SIZE_TAGS = ("preset", "custom")
ImageSizeInput = Annotated[
    Union[Annotated[ImageSizePreset, Tag(SIZE_TAGS[0])], Annotated[ImageSize, Tag(SIZE_TAGS[1])]],
    Discriminator(_size_kind, custom_error_type="image_size_type",
                  custom_error_message="Input should be a preset name or an object {width, height}"),
]

Seed = Annotated[int, Field(ge=MIN_SEED, le=MAX_SEED)]


class LoraWeight(BaseModel):
    """fal's `LoraWeight`: a LoRA to apply and how strongly."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = Field(..., min_length=1, max_length=2048, description=(
        "An https URL of a .safetensors LoRA, an s3:// (fsspec) URL, a Hugging Face repo id "
        "(owner/name or owner/name/file.safetensors), or a file name in this server's LoRA folder."))
    scale: float = Field(1.0, description="How strongly the LoRA applies; LoRAs add up, each times its scale.")
def readable_errors(errors: list[ErrorDetails]) -> list[ErrorDetails]:
    """pydantic's errors without the image size union's internal tags in their `loc`."""
    return [error | {"loc": tuple(part for part in error["loc"] if part not in SIZE_TAGS)} for error in errors]


class _CommonInput(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # Python's JSON parser accepts NaN

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS,
                        description="The prompt to generate an image from (the model reads ~512 tokens of it).")
    guidance_scale: float = Field(4.5, ge=1, le=20, description="How closely the image follows the prompt.")
    seed: Seed | None = Field(None, description="Same seed and inputs give the same image; random if unset.")
    sync_mode: bool = Field(False, description="Return images as data URIs and keep no request history.")
    num_images: int = Field(1, ge=1, le=4)
    enable_safety_checker: bool = True
    output_format: OutputFormat = "jpeg"
    acceleration: Acceleration = "none"
    loras: list[LoraWeight] = Field(
        default_factory=list, description="LoRAs to apply (FLUX.1-dev LoRAs fit SRPO); they add up, each times its scale."
    )

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else secrets.randbelow(RANDOM_SEED_BOUND)


# A 64x64 orange PNG: an image-to-image example that runs from the API docs on a machine without internet.
EXAMPLE_SOURCE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAUUlEQVR42u3PMQ0AMAgAMJga5CAbWVPBQdI6aE5XX"
    "PbiOAEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAYF9H5KYAcAV7LD0AAAAAElFTkSuQmCC"
)


class TextToImageInput(_CommonInput):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "a lighthouse at dusk, oil painting", "image_size": "landscape_4_3", "num_inference_steps": 28,
         "seed": 7},
        {"prompt": "a red fox in snow", "image_size": {"width": 768, "height": 512}, "num_images": 2,
         "output_format": "png"},
    ]})

    image_size: ImageSizeInput = Field("landscape_4_3", description="A preset or {width, height}.")
    num_inference_steps: int = Field(28, ge=1, le=50)

    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images this request produces."""
        if isinstance(self.image_size, str):
            return PRESET_SIZES[self.image_size]
        return round_side(self.image_size.width), round_side(self.image_size.height)


class ImageToImageInput(_CommonInput):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "a watercolour of a sunset", "image_url": EXAMPLE_SOURCE_IMAGE, "strength": 0.8, "seed": 7},
    ]})

    image_url: str = Field(..., description="http(s) URL or data URI of the source image.")
    strength: float = Field(0.95, ge=0.01, le=1, description="1.0 ignores the source; small values keep it.")
    num_inference_steps: int = Field(40, ge=10, le=50)

    @field_validator("image_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("http://", "https://", "data:")):
            raise PydanticCustomError("image_url", "image_url must be an http(s) URL or a data: URI")
        return value


class ObjectLifecyclePreference(BaseModel):
    """fal's `x-fal-object-lifecycle-preference` header."""

    expiration_duration_seconds: int = Field(..., ge=1, le=10 * 365 * 24 * 3600)


class Image(BaseModel):
    url: str
    width: int
    height: int
    content_type: str
    file_name: str
    file_size: int


class Output(BaseModel):
    images: list[Image]
    timings: dict[str, float] = Field(
        ..., description="Seconds spent per phase; `inference` is the model's time for the whole request.",
        examples=[{"inference": 1.2345}],
    )
    seed: int
    has_nsfw_concepts: list[bool]
    prompt: str

