"""The OpenAI images API's shapes (`/v1/images/generations`, `/v1/images/edits`, `/v1/models`).

OpenAI's fields that mean nothing for this model (`quality`, `style`, `background`, `moderation`,
`user`) are accepted and ignored, as other OpenAI-compatible image servers do. The sampling
fields of the fal API (`seed`, `num_inference_steps`, `guidance_scale`, `enable_safety_checker`,
`acceleration`, `loras`, and `strength` for edits) are extensions: the official client sends them with
`extra_body`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from api.schemas import MAX_PROMPT_CHARS, Acceleration, LoraWeight, Seed

MODEL_ID = "flux-srpo"
SIZE_PATTERN = re.compile(r"^(?P<width>\d+)x(?P<height>\d+)$")
AUTO_SIZE = (1024, 1024)
SIZE_STEP = 16  # the model works on multiples of 16 pixels
MIN_SIDE = 64


class _ImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, description=f"Any value; this server serves {MODEL_ID}.")
    n: int = Field(1, ge=1, le=4, description="Images to generate (at most 4).")
    size: str = Field("auto", description=f"WIDTHxHEIGHT, sides multiples of {SIZE_STEP}; auto = 1024x1024.")
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg"] = "png"
    seed: Seed | None = None
    num_inference_steps: int | None = Field(None, ge=1, le=50)
    guidance_scale: float | None = Field(None, ge=1, le=20)
    enable_safety_checker: bool = True
    acceleration: Acceleration = "none"
    loras: list[LoraWeight] = Field(default_factory=list, description="Extension: fal's `loras` ([{path, scale}]).")

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_form(cls, value: Any) -> Any:
        # A multipart edit carries each extension as a form field: the list arrives as JSON text.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError("loras must be a JSON list of {path, scale}") from exc
        return value

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str) -> str:
        if value != "auto" and (match := SIZE_PATTERN.match(value)) is None:
            raise PydanticCustomError("size", "size must be 'auto' or WIDTHxHEIGHT such as 1024x768, not {value}",
                                      {"value": repr(value)})
        if value != "auto":
            width, height = int(match["width"]), int(match["height"])
            if width % SIZE_STEP or height % SIZE_STEP or min(width, height) < MIN_SIDE:
                raise PydanticCustomError("size", "size {value}: each side must be a multiple of {step}, at least {least}",
                                          {"value": value, "step": SIZE_STEP, "least": MIN_SIDE})
        return value

    def dimensions(self) -> tuple[int, int] | None:
        """(width, height), or None for auto."""
        match = SIZE_PATTERN.match(self.size)
        return (int(match["width"]), int(match["height"])) if match else None


class ImageGenerationRequest(_ImageRequest):
    pass


class ImageEditRequest(_ImageRequest):
    """The form fields of `/v1/images/edits` (the image comes as a file part)."""

    strength: float = Field(0.95, ge=0.01, le=1, description="Extension: 1.0 ignores the source image.")
    num_inference_steps: int | None = Field(None, ge=10, le=50)


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg"] | None = None
    size: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
