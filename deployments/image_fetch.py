"""Fetching `image_url` for image-to-image: data URIs and http(s), under size, pixel and time limits.

Hosts that resolve into private, loopback, link-local, reserved or metadata ranges are refused
(before any connection is made) unless a setting lists their network, so a request cannot make
the server reach its own network.
Redirects are followed by hand so every hop is checked.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx

from api.images import ImageLoadError

MAX_REDIRECTS = 3


def _decode_data_uri(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageLoadError("malformed data URI")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageLoadError(f"data URI larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=False) if header.endswith(";base64") else unquote_to_bytes(payload)
    except ValueError as exc:
        raise ImageLoadError("malformed base64 in data URI") from exc
    if len(data) > max_bytes:
        raise ImageLoadError(f"data URI larger than {max_bytes} bytes")
    return data


async def _check_host(host: str, port: int, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImageLoadError(f"cannot resolve host {host}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if any(address in net for net in allowed):
            continue
        if not address.is_global or address.is_multicast:
            raise ImageLoadError(f"host {host} resolves to a non-public address, which this server does not fetch")


async def fetch_image_bytes(url: str, *, max_bytes: int, timeout_s: float, allowed_networks: list[str]) -> bytes:
    """The bytes behind `url`; raises ImageLoadError with a message safe to return to the client."""
    allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
    if url.startswith("data:"):
        return _decode_data_uri(url, max_bytes)
    try:
        async with asyncio.timeout(timeout_s), httpx.AsyncClient(follow_redirects=False, timeout=timeout_s) as client:
            for _ in range(MAX_REDIRECTS + 1):
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ImageLoadError("only http(s) URLs and data URIs are fetched")
                await _check_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), allowed)
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise ImageLoadError(f"HTTP {response.status_code}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > max_bytes:
                        raise ImageLoadError(f"image larger than {max_bytes} bytes")
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise ImageLoadError(f"image larger than {max_bytes} bytes")
                        chunks.append(chunk)
                    return b"".join(chunks)
            raise ImageLoadError("too many redirects")
    except TimeoutError as exc:
        raise ImageLoadError(f"timed out after {timeout_s} s") from exc
    except httpx.HTTPError as exc:
        raise ImageLoadError(f"connection failed ({type(exc).__name__})") from exc
