"""Fetching `image_url` for image-to-image: data URIs and http(s), under size, pixel and time limits.

Every hop, redirects included (followed by hand), passes `outbound.check_destination` first and
then connects to the address that was checked.
"""

from __future__ import annotations

import asyncio
import base64
from urllib.parse import unquote_to_bytes, urljoin

import httpx

from server.images import ImageLoadError
from server.outbound import BlockedDestination, check_destination, describe_failure

MAX_REDIRECTS = 3
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
    try:
        async with asyncio.timeout(timeout_s), httpx.AsyncClient(follow_redirects=False, timeout=timeout_s) as client:
            for _ in range(MAX_REDIRECTS + 1):
                try:
                    destination = await check_destination(url, allowed_networks, IMAGE_URL_SETTING)
                except BlockedDestination as exc:
                    raise ImageLoadError(str(exc)) from exc
                async with client.stream("GET", **destination.request_args()) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise ImageLoadError(f"HTTP {response.status_code}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > max_bytes:
                        raise ImageLoadError(f"image larger than {max_bytes} bytes ({MAX_BYTES_SETTING})")
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise ImageLoadError(f"image larger than {max_bytes} bytes ({MAX_BYTES_SETTING})")
                        chunks.append(chunk)
                    return b"".join(chunks)
            raise ImageLoadError("too many redirects")
    except TimeoutError as exc:
        raise ImageLoadError(f"timed out after {timeout_s} s (SRPO_IMAGE_FETCH_TIMEOUT_S)") from exc
    except httpx.HTTPError as exc:
        raise ImageLoadError(describe_failure(exc)) from exc
