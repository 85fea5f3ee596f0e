"""Fetching `image_url` for image-to-image: data URIs and http(s), under size, pixel and time limits.

Every hop, redirects included, goes through `outbound.guarded_get`: checked first, then connected
to the address that was checked.
"""

from __future__ import annotations

import asyncio
import base64
from urllib.parse import unquote_to_bytes

import httpx

from server.images import ImageLoadError
from server.outbound import FetchError, describe_failure, guarded_get, limited_chunks

# The settings behind the limits, named in the messages so a user knows what to change.
MAX_BYTES_SETTING = "SRPO_IMAGE_FETCH_MAX_BYTES"


def _decode_data_uri(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageLoadError("malformed data URI")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageLoadError(f"data URI larger than {max_bytes} bytes ({MAX_BYTES_SETTING})")
    try:
        data = base64.b64decode(payload, validate=False) if header.endswith(";base64") else unquote_to_bytes(payload)
    except ValueError as exc:
        raise ImageLoadError("malformed base64 in data URI") from exc
    if len(data) > max_bytes:
        raise ImageLoadError(f"data URI larger than {max_bytes} bytes ({MAX_BYTES_SETTING})")
    return data


IMAGE_URL_SETTING = "SRPO_IMAGE_URL_ALLOWED_NETWORKS"


async def fetch_image_bytes(url: str, *, max_bytes: int, timeout_s: float, allowed_networks: list[str]) -> bytes:
    """The bytes behind `url`; raises ImageLoadError with a message safe to return to the client."""
    if url.startswith("data:"):
        return _decode_data_uri(url, max_bytes)
    too_large = f"image larger than {max_bytes} bytes ({MAX_BYTES_SETTING})"
    try:
        async with asyncio.timeout(timeout_s), httpx.AsyncClient(follow_redirects=False, timeout=timeout_s) as client:
            async with guarded_get(client, url, allowed_networks, IMAGE_URL_SETTING) as response:
                return b"".join([chunk async for chunk in limited_chunks(response, max_bytes, too_large)])
    except FetchError as exc:
        raise ImageLoadError(str(exc)) from exc
    except TimeoutError as exc:
        raise ImageLoadError(f"timed out after {timeout_s} s (SRPO_IMAGE_FETCH_TIMEOUT_S)") from exc
    except httpx.HTTPError as exc:
        raise ImageLoadError(describe_failure(exc)) from exc
