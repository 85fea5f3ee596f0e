"""What every HTTP request goes through before its route: its fal request id, the API key check and
an `error_type` on every failure.

Plain ASGI rather than Starlette's `@app.middleware("http")`: that one runs each request's route in
a task group of its own with memory streams between, which cost more than the whole status route
(issue 25's profile), and every status poll pays it.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas import ERROR_TYPE_HEADER, REQUEST_ID_HEADER
from server.errors import default_error_type
from server.logging_context import request_context
from server.openai_api import OpenAIError
from server.playground import is_public_page

logger = logging.getLogger(__name__)


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def _public(method: str, path: str) -> bool:
    """Health (probes), files (unguessable names) and the pages need no key; CORS preflights carry none."""
    return method == "OPTIONS" or path in ("/health", "/livez") or path.startswith("/files/") or is_public_page(path)


def _key_accepted(headers: Headers, path: str, keys: list[str]) -> bool:
    """fal's `Authorization: Key <key>`; on the OpenAI routes also OpenAI's `Bearer <key>`."""
    scheme, _, given = headers.get("authorization", "").partition(" ")
    schemes = ("key", "bearer") if is_openai(path) else ("key",)
    if scheme.lower() not in schemes or not given:
        return False
    return any(hmac.compare_digest(given.strip().encode(), key.encode()) for key in keys)


class ApiKeys:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.keys or _public(scope["method"], scope["path"])
                or _key_accepted(Headers(scope=scope), scope["path"], self.keys)):
            await self.app(scope, receive, send)
            return
        if is_openai(scope["path"]):
            response = OpenAIError(401, "Missing or invalid API key (send 'Authorization: Bearer <key>')",
                                   code="invalid_api_key").response()
        else:
            response = JSONResponse({"detail": "Missing or invalid API key (send 'Authorization: Key <key>')"},
                                    status_code=401, headers={"WWW-Authenticate": "Key"})
        await response(scope, receive, send)


def with_error_type(status: int, headers: MutableHeaders, body: bytes) -> bytes:
    """fal's contract: every failure names its error_type in the body and in X-Fal-Error-Type."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and "error" not in data:  # "error": OpenAI's shape, which has its own type
        error_type = data.setdefault("error_type", headers.get(ERROR_TYPE_HEADER) or default_error_type(status))
        headers[ERROR_TYPE_HEADER] = error_type
        body = JSONResponse(data).body
    headers["content-length"] = str(len(body))
    return body


class RequestIds:
    """A fal request id per request: on every log line written while serving it and in its response's
    header. A failure's body gets its error type; an exception becomes a plain 500 (never a trace)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = str(uuid.uuid4())
        started: Message | None = None  # a failure's start, held until its body is complete
        chunks: list[bytes] = []
        sent = False

        async def send_tagged(message: Message) -> None:
            nonlocal started, sent
            if message["type"] == "http.response.start":
                sent = True
                MutableHeaders(scope=message).setdefault(REQUEST_ID_HEADER, rid)
                if message["status"] >= 400 and scope["path"] != "/health":
                    started = message  # error bodies are small: read them whole
                    return
            elif message["type"] == "http.response.body" and started is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = with_error_type(started["status"], MutableHeaders(scope=started), b"".join(chunks))
                await send(started)
                message = {"type": "http.response.body", "body": body}
            await send(message)

        with request_context(rid):
            try:
                await self.app(scope, receive, send_tagged)
            except Exception:
                if sent:
                    raise
                logger.exception("unhandled error in request")
                await JSONResponse({"detail": "Internal server error"}, status_code=500)(scope, receive, send_tagged)
