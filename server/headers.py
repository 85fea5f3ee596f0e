"""fal's per-request headers, read in one place so /docs lists them and bad values get a 422."""

from __future__ import annotations

import math
from typing import Literal

from fastapi import Header
from pydantic import ValidationError

from api.schemas import (
    LIFECYCLE_HEADER,
    NO_RETRY_HEADER,
    PRIORITY_HEADER,
    RUNNER_HINT_HEADER,
    START_TIMEOUT_HEADER,
    ObjectLifecyclePreference,
)
from server.errors import field_error


class FalHeaders:
    """A FastAPI dependency: `headers: FalHeaders = Depends()`."""

    def __init__(
        self,
        lifecycle: str | None = Header(
            None, alias=LIFECYCLE_HEADER, description='JSON {"expiration_duration_seconds": N}: keep outputs N s.'
        ),
        start_timeout: str | None = Header(
            None, alias=START_TIMEOUT_HEADER, description="Seconds a queued request may wait before it starts; "
            "past it the request ends 504 (X-Fal-Request-Timeout-Type: user).",
        ),
        no_retry: str | None = Header(
            None, alias=NO_RETRY_HEADER, description="1/true: never run the request again after a replica failure."
        ),
        priority: Literal["normal", "low"] = Header(
            "normal", alias=PRIORITY_HEADER, description="Queue priority: a low request starts only when no normal "
            "one waits, or once it has waited SRPO_QUEUE_LOW_PRIORITY_MAX_WAIT_S.",
        ),
        runner_hint: str | None = Header(
            None, alias=RUNNER_HINT_HEADER, description="Accepted for fal compatibility; every replica serves every "
            "request here, so it changes no routing and never delays one.",
        ),
    ) -> None:
        self.output_ttl_s = _output_ttl(lifecycle)
        self.start_timeout_s = _start_timeout(start_timeout)
        self.retry = (no_retry or "").strip().lower() not in ("1", "true", "yes")
        self.priority = priority
        self.runner_hint = runner_hint

    @classmethod
    def absent(cls) -> FalHeaders:
        """What a call that sent none of them gets (the OpenAI routes)."""
        return cls(lifecycle=None, start_timeout=None, no_retry=None, priority="normal", runner_hint=None)


def _output_ttl(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(ObjectLifecyclePreference.model_validate_json(value).expiration_duration_seconds)
    except ValidationError as exc:
        message = 'expected JSON {"expiration_duration_seconds": <1 or more>}'
        raise field_error(LIFECYCLE_HEADER, message, value, location="header") from exc


def _start_timeout(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise field_error(START_TIMEOUT_HEADER, "expected a number of seconds above 0", value, location="header")
    return seconds
