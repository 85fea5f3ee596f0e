"""Where the server may connect on a user's behalf (image_url, fal_webhook).

A user-given URL whose host resolves into a private, loopback, link-local, reserved or metadata
range is refused before any connection is made, unless a setting lists its network: a request
must not make the server reach its own network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit


class BlockedDestination(Exception):
    """The URL may not be reached; the message is safe to return to the client."""


async def check_destination(url: str, allowed_networks: list[str]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BlockedDestination("only http(s) URLs are reached")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BlockedDestination(f"cannot resolve host {parts.hostname}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if any(address in net for net in allowed):
            continue
        if not address.is_global or address.is_multicast:
            raise BlockedDestination(
                f"host {parts.hostname} resolves to a non-public address, which this server does not reach"
            )
