"""What the service reports for monitoring, without Ray.

`Telemetry` is the interface and its no-op default (tests, the in-process mode); the Serve ingress
passes `deployments/metrics.ServeTelemetry`, which exports every call as a Ray Serve metric.
Endpoint and mode names are the values of the metrics' tags.
"""

from __future__ import annotations

import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.queue_schemas import ENDPOINTS
from api.schemas import ERROR_TYPE_HEADER
from server.errors import default_error_type

# The queue's endpoint paths (a record's `endpoint`) -> the endpoint tag.
ENDPOINT_NAMES = {ENDPOINTS[0]: "text-to-image", ENDPOINTS[1]: "image-to-image"}
# Generation routes -> (endpoint, mode). A queue submission only ends here when it is refused.
ROUTES = {
    **{f"/{path}": (name, "sync") for path, name in ENDPOINT_NAMES.items()},
    **{f"/queue/{path}": (name, "queue") for path, name in ENDPOINT_NAMES.items()},
    "/v1/images/generations": ("openai-generations", "sync"),
    "/v1/images/edits": ("openai-edits", "sync"),
}


class Telemetry:
    """The events the server reports; this base class drops them."""

    def request_finished(self, endpoint: str, mode: str, seconds: float, error_type: str | None) -> None:
        """A request ended (`error_type` None: it succeeded); `seconds` from arrival to the end."""

    def requests_running(self, mode: str, count: int) -> None:
        """How many requests of `mode` this replica is running now."""

    def requests_waiting(self, count: int) -> None:
        """How many queued requests wait to be claimed (the shared store's count)."""

    def queue_wait(self, seconds: float) -> None:
        """A queued request was claimed for the first time `seconds` after its submission."""

    def retried(self, reason: str) -> None:
        """A request runs again: `replica_failure` (a stage died mid-request) or `requeued` (its lease ran out)."""

    def images_generated(self, count: int) -> None:
        """Images a successful request produced."""

    def cold_start(self, seconds: float) -> None:
        """A request arrived with no Denoiser replica running (scaled to zero) and waited `seconds`
        for one to start it."""


class HttpTelemetry:
    """Plain ASGI middleware reporting the generation routes: every synchronous request (its latency,
    outcome and the number running) and every refused queue submission. Accepted submissions are
    reported by the queue worker when they end. Add it outside the middleware that sets error types."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app, self.telemetry = app, telemetry
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        endpoint, mode = route
        sync, began = mode == "sync", time.perf_counter()
        status, error_type = 500, None

        async def seen(message: Message) -> None:
            nonlocal status, error_type
            if message["type"] == "http.response.start":
                status = message["status"]
                error_type = Headers(raw=message["headers"]).get(ERROR_TYPE_HEADER)
            await send(message)

        if sync:
            self.in_flight += 1
            self.telemetry.requests_running(mode, self.in_flight)
        try:
            await self.app(scope, receive, seen)
        finally:
            if sync:
                self.in_flight -= 1
                self.telemetry.requests_running(mode, self.in_flight)
        if sync or status >= 400:
            # OpenAI's error bodies carry no X-Fal-Error-Type: their status names them.
            error_type = (error_type or default_error_type(status)) if status >= 400 else None
            self.telemetry.request_finished(endpoint, mode, time.perf_counter() - began, error_type)
