"""The proxy route of fal's JS client (`proxyUrl: {url, when: "always"}`).

The client sends every call to one URL with the real target in `x-fal-target-url`; this ASGI
wrapper maps `https://fal.run/X` to `/X` and `https://queue.fal.run/X` to `/queue/X` (query kept)
and hands the request on unchanged, so streaming responses pass straight through.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

PROXY_PATH = "/api/fal/proxy"
TARGET_HEADER = b"x-fal-target-url"
HOST_PREFIXES = {"fal.run": "", "queue.fal.run": "/queue"}
METHODS = {"GET", "POST", "PUT"}


def map_target(target: str) -> tuple[str, str] | None:
    """(path, query) on this server for a fal URL, or None when it is not one of fal's run hosts."""
    parts = urlsplit(target)
    if parts.scheme != "https" or parts.hostname not in HOST_PREFIXES or parts.port is not None:
        return None
    return HOST_PREFIXES[parts.hostname] + (parts.path or "/"), parts.query


class FalProxyRoute:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PROXY_PATH or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        target = dict(scope["headers"]).get(TARGET_HEADER, b"").decode("latin-1")
        mapped = map_target(target) if scope["method"] in METHODS else None
        if mapped is None:
            detail = (f"{PROXY_PATH} takes GET, POST or PUT with an {TARGET_HEADER.decode()} header "
                      "naming https://fal.run/... or https://queue.fal.run/...")
            await JSONResponse({"detail": detail}, status_code=400 if scope["method"] in METHODS else 405)(
                scope, receive, send)
            return
        path, query = mapped
        await self.app(dict(scope, path=path, raw_path=path.encode(), query_string=query.encode()), receive, send)
