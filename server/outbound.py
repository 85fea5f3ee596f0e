"""Where the server may connect on a user's behalf (image_url, fal_webhook), and connecting there.

A user-given URL's host is resolved once; if any of its addresses is not public (private,
loopback, link-local and cloud metadata, CGNAT, reserved, multicast, or an IPv6 form that embeds
or tunnels IPv4: NAT64, 6to4, Teredo, IPv4-mapped and -compatible), the URL is refused before any
connection, unless a setting lists that network. The connection then goes to exactly the address
that was checked (`Destination.request_args`): the HTTP client never resolves the name again, so
DNS rebinding between the check and the connect cannot redirect it. TLS still verifies the
certificate against the host name (SNI), and the Host header is the original one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Any, AsyncIterator
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Global by the IANA registries (so `is_global` passes them), but they reach or embed IPv4 space.
TUNNELS = [ipaddress.ip_network(n) for n in (
    "64:ff9b::/96",  # NAT64
    "64:ff9b:1::/48",  # local-use NAT64
    "2002::/16",  # 6to4
    "2001::/32",  # Teredo
    "::ffff:0:0/96",  # IPv4-mapped
    "::/96",  # IPv4-compatible (deprecated)
)]


class FetchError(Exception):
    """A user-given URL could not be fetched; the message is safe to return to the client."""


class BlockedDestination(FetchError):
    """The URL may not be reached; the message is safe to return to the client."""


MAX_REDIRECTS = 3


def refused(address: IPAddress) -> bool:
    """Whether an address is outside the public internet (or tunnels into IPv4 space)."""
    return not address.is_global or address.is_multicast or any(address in net for net in TUNNELS)


@dataclass(frozen=True)
class Destination:
    """A URL whose host resolved to `address`, every resolved address having been checked."""

    url: str
    host: str
    address: str

    def request_args(self) -> dict[str, Any]:
        """httpx request arguments that connect to the checked address, not to a new resolution."""
        parts = urlsplit(self.url)
        ip = f"[{self.address}]" if ":" in self.address else self.address
        netloc = ip if parts.port is None else f"{ip}:{parts.port}"
        host_header = parts.netloc.rpartition("@")[2]  # without userinfo
        return {
            "url": urlunsplit(parts._replace(netloc=netloc)),
            "headers": {"Host": host_header},
            "extensions": {"sni_hostname": self.host},  # TLS: SNI and certificate check use the name
        }


def describe_failure(exc: BaseException) -> str:
    """Why a request to a checked destination failed, safe to return to the client: a certificate that
    does not verify says so (the usual mistake with https), anything else names the error's kind."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed ({seen.verify_message})"
        seen = seen.__cause__ or seen.__context__
    return f"connection failed ({type(exc).__name__})"


async def check_destination(url: str, allowed_networks: list[str], setting: str) -> Destination:
    """Resolve `url`'s host once and refuse it unless every address may be reached; `setting` is the
    variable that allows more networks, named in the message."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BlockedDestination("only http(s) URLs are reached")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BlockedDestination(f"cannot resolve host {parts.hostname}") from exc
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if refused(address) and not any(address in net for net in allowed):
            raise BlockedDestination(
                f"host {parts.hostname} resolves to a non-public address ({address}), which this server does not "
                f"reach; list its network in {setting} to allow it"
            )
    return Destination(url, parts.hostname, str(addresses[0]))


@contextlib.asynccontextmanager
async def guarded_get(client: httpx.AsyncClient, url: str, allowed_networks: list[str],
                      setting: str) -> AsyncIterator[httpx.Response]:
    """The streamed 200 response for `url`, every hop (redirects followed by hand) checked and
    connected to the address that was checked; FetchError otherwise."""
    for _ in range(MAX_REDIRECTS + 1):
        destination = await check_destination(url, allowed_networks, setting)
        async with client.stream("GET", **destination.request_args()) as response:
            if response.is_redirect:
                url = urljoin(url, response.headers["location"])
                continue
            if response.status_code != 200:
                raise FetchError(f"HTTP {response.status_code}")
            yield response
            return
    raise FetchError("too many redirects")


async def limited_chunks(response: httpx.Response, max_bytes: int, too_large: str) -> AsyncIterator[bytes]:
    """The response body in chunks; FetchError(`too_large`) once it declares or reaches more than max_bytes."""
    if int(response.headers.get("content-length") or 0) > max_bytes:
        raise FetchError(too_large)
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise FetchError(too_large)
        yield chunk
