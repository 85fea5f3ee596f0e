"""Errors the service raises with a message for the client; the HTTP app and the queue turn them into bodies."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request that cannot be served: `detail` goes to the client as `{"detail": ...}` with `status_code`."""

    def __init__(self, detail: Any, status_code: int, error_type: str) -> None:
        super().__init__(detail if isinstance(detail, str) else error_type)
        self.detail = detail
        self.status_code = status_code
        self.error_type = error_type


class InputError(ServiceError):
    """The client's input: 422 unless said otherwise."""

    def __init__(self, detail: Any, status_code: int = 422) -> None:
        super().__init__(detail, status_code, "input_error")


def field_error(field: str, message: str, value: Any, location: str = "body") -> InputError:
    """A 422 shaped like FastAPI's validation errors, for checks that depend on this deployment's limits."""
    return InputError([{"loc": [location, field], "msg": f"Value error, {message}", "type": "value_error",
                        "input": value}])


# fal's names where fal has one (request_timeout, runner_disconnected, internal_error); ours otherwise.
_BY_STATUS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 422: "input_error", 429: "too_many_requests", 504: "request_timeout"}


def default_error_type(status_code: int) -> str:
    """The error_type of a failure that did not name its own."""
    return _BY_STATUS.get(status_code, "internal_error" if status_code >= 500 else "bad_request")
