"""Errors the service raises for the client's input; the HTTP app and the queue turn them into bodies."""

from __future__ import annotations

from typing import Any


class InputError(Exception):
    """Input that cannot be served: `detail` goes to the client as `{"detail": ...}` with `status_code`."""

    def __init__(self, detail: Any, status_code: int = 422) -> None:
        super().__init__(detail if isinstance(detail, str) else "invalid input")
        self.detail = detail
        self.status_code = status_code


def field_error(field: str, message: str, value: Any) -> InputError:
    """A 422 shaped like FastAPI's validation errors, for checks that depend on this deployment's limits."""
    return InputError([{"loc": ["body", field], "msg": f"Value error, {message}", "type": "value_error",
                        "input": value}])
