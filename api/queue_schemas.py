"""The external shapes of fal's queue protocol: submit and status bodies, log entries, webhooks."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

QueueState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]

# Owner/alias of the app: status, result and cancel live under it for both endpoints.
APP_ALIAS = "fal-ai/flux"
ENDPOINTS = ("fal-ai/flux/srpo", "fal-ai/flux/srpo/image-to-image")


class LogEntry(BaseModel):
    message: str
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    source: Literal["USER"] = "USER"
    timestamp: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


class QueueUrls(BaseModel):
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str

    @classmethod
    def for_request(cls, base: str, request_id: str) -> "QueueUrls":
        """`base` is the scheme and host the client used."""
        response_url = f"{base}/queue/{APP_ALIAS}/requests/{request_id}"
        return cls(
            request_id=request_id,
            response_url=response_url,
            status_url=f"{response_url}/status",
            cancel_url=f"{response_url}/cancel",
        )


class SubmitResponse(QueueUrls):
    status: Literal["IN_QUEUE"] = "IN_QUEUE"
    queue_position: int


class QueueStatus(QueueUrls):
    """A status body. `logs` is present (possibly null) once the request has started."""

    status: QueueState
    queue_position: int | None = None
    logs: list[LogEntry] | None = None
    metrics: dict[str, float] | None = None
    error: str | None = None
    error_type: str | None = None

    def body(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True)
        if self.status != "IN_QUEUE":
            data["logs"] = data.get("logs")  # a plain subscribe() breaks without the key
        return data


class CancelResponse(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED"]


class WebhookBody(BaseModel):
    request_id: str
    gateway_request_id: str
    status: Literal["OK", "ERROR"]
    payload: Any
    error: str | None
