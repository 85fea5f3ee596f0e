"""Image bytes in and out: decoding source images under limits, encoding outputs as JPEG/PNG."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from api.schemas import OutputFormat

CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png"}


class ImageLoadError(ValueError):
    """A source image that cannot be used; the message is safe to show the client."""


def decode_image(data: bytes, max_source_pixels: int) -> Image.Image:
    """Decode image bytes to RGB, refusing decompression bombs before pixels are decoded."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            if w * h > max_source_pixels:
                raise ImageLoadError(
                    f"image is {w}x{h}, more than {max_source_pixels} pixels (SRPO_IMAGE_MAX_SOURCE_PIXELS)")
            probe.load()
            return probe.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageLoadError("not a readable image") from exc


def encode_image(pixels: np.ndarray, fmt: OutputFormat) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    else:
        Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"
