"""A cap on request bodies (413 before any work), as plain ASGI so nothing reads past it.

A declared Content-Length over the cap is refused before the body is read; a chunked body is
read here up to the cap and refused as soon as it passes it, then replayed to the app.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SETTING = "SRPO_MAX_BODY_BYTES"


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server reads no more than it declared
            return
        messages: list[Message] = []
        size, more = 0, True
        while more:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            more = message["type"] == "http.request" and message.get("more_body", False)

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"Request body larger than {self.max_bytes} bytes ({SETTING})"
        await JSONResponse({"detail": detail, "error_type": "payload_too_large"}, status_code=413,
                           headers={"x-fal-error-type": "payload_too_large", "connection": "close"})(
            scope, receive, send)
