"""fal's per-request headers, read in one place so /docs lists them and bad values get a 422."""

from __future__ import annotations

import math

from fastapi import Header
from pydantic import ValidationError

from api.schemas import LIFECYCLE_HEADER, NO_RETRY_HEADER, START_TIMEOUT_HEADER, ObjectLifecyclePreference
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
    ) -> None:
        self.output_ttl_s = _output_ttl(lifecycle)
        self.start_timeout_s = _start_timeout(start_timeout)
        self.retry = (no_retry or "").strip().lower() not in ("1", "true", "yes")


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
