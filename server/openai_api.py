"""OpenAI's images API over the same service as the fal routes: `/v1/images/generations`,
`/v1/images/edits` (multipart upload) and `/v1/models`, with OpenAI's error body.

A call becomes the equivalent fal input, so the same seed and settings give the fal route's pixels.
"""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image as PILImage
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from api.openai_schemas import (
    AUTO_SIZE,
    MODEL_ID,
    ErrorDetail,
    ErrorResponse,
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    Model,
    ModelList,
)
from api.schemas import ImageSize, ImageToImageInput, Output, TextToImageInput, readable_errors
from server.errors import ServiceError
from server.images import data_uri

RunSync = Callable[[TextToImageInput | ImageToImageInput, Request], Awaitable[Output]]
CREATED = int(time.time())  # what /v1/models reports as the model's creation time
SAMPLING_FIELDS = ("seed", "num_inference_steps", "guidance_scale", "enable_safety_checker", "acceleration", "loras")
EDIT_FILE_FIELDS = ("image", "image[]", "mask")


class OpenAIError(Exception):
    def __init__(self, status_code: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = ErrorResponse(error=ErrorDetail(message=message, type=error_type, param=param, code=code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status_code)


def from_validation_error(exc: ValidationError) -> OpenAIError:
    first = readable_errors(exc.errors())[0]
    param = ".".join(str(part) for part in first["loc"] if part != "body") or None
    return OpenAIError(400, f"Invalid value for '{param}': {first['msg']}" if param else first["msg"], param=param)


def from_service_error(exc: ServiceError) -> OpenAIError:
    if exc.status_code == 422:  # OpenAI answers every invalid request with 400
        detail = exc.detail if isinstance(exc.detail, str) else "; ".join(e["msg"] for e in exc.detail)
        return OpenAIError(400, detail)
    kind = "timeout" if exc.status_code == 504 else "server_error"
    return OpenAIError(exc.status_code, str(exc.detail), kind, code=exc.error_type)


def _fal_fields(body: ImageGenerationRequest | ImageEditRequest) -> dict[str, Any]:
    fields = {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None}
    return fields | {"prompt": body.prompt, "num_images": body.n, "output_format": body.output_format,
                     "sync_mode": body.response_format == "b64_json"}


def _images_response(output: Output, body: ImageGenerationRequest | ImageEditRequest) -> ImagesResponse:
    def item(url: str) -> ImageData:
        if body.response_format == "b64_json":
            return ImageData(b64_json=url.split(",", 1)[1])  # sync_mode gave a data URI
        return ImageData(url=url)

    first = output.images[0]
    return ImagesResponse(created=int(time.time()), data=[item(i.url) for i in output.images],
                          output_format=body.output_format, size=f"{first.width}x{first.height}")


def _resized_png(data: bytes, size: tuple[int, int] | None) -> bytes:
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if size is not None and image.size != size:
                image = image.resize(size, PILImage.Resampling.LANCZOS)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            return buf.getvalue()
    except (OSError, PILImage.DecompressionBombError) as exc:
        raise OpenAIError(400, "image is not a readable image file", param="image") from exc


def openai_router(run_sync: RunSync) -> APIRouter:
    """`run_sync(fal_input, request)` runs a synchronous fal request (with its concurrency limit)."""
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

    async def run(fal_input: TextToImageInput | ImageToImageInput, request: Request) -> Output:
        try:
            return await run_sync(fal_input, request)
        except ServiceError as exc:
            raise from_service_error(exc) from exc

    @router.get("/models", response_model=ModelList, summary="The model this server serves")
    async def models() -> ModelList:
        return ModelList(data=[Model(id=MODEL_ID, created=CREATED, owned_by="srpo-serve")])

    @router.post("/images/generations", response_model=ImagesResponse, summary="Create images (OpenAI)")
    async def generations(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
        width, height = body.dimensions() or AUTO_SIZE
        try:
            fal_input = TextToImageInput(**_fal_fields(body), image_size=ImageSize(width=width, height=height))
        except ValidationError as exc:
            raise from_validation_error(exc) from exc
        return _images_response(await run(fal_input, request), body)

    @router.post("/images/edits", response_model=ImagesResponse, summary="Edit an image (OpenAI, multipart)",
                 openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                     "type": "object", "required": ["image", "prompt"],
                     "properties": {"image": {"type": "string", "format": "binary"},
                                    **ImageEditRequest.model_json_schema()["properties"]}}}}}})
    async def edits(request: Request) -> ImagesResponse:
        form = await request.form()
        images = [v for k in ("image", "image[]") for v in form.getlist(k) if isinstance(v, UploadFile)]
        if len(images) != 1:
            raise OpenAIError(400, "send exactly one image file as 'image'", param="image")
        try:
            body = ImageEditRequest.model_validate({k: v for k, v in form.items() if k not in EDIT_FILE_FIELDS})
        except ValidationError as exc:
            raise from_validation_error(exc) from exc
        png = await asyncio.to_thread(_resized_png, await images[0].read(), body.dimensions())
        try:
            fal_input = ImageToImageInput(**_fal_fields(body), image_url=data_uri(png, "image/png"),
                                          strength=body.strength)
        except ValidationError as exc:
            raise from_validation_error(exc) from exc
        return _images_response(await run(fal_input, request), body)

    return router
