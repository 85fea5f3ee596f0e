"""The fal request id of the request being served, in every log line written while serving it.

The HTTP app sets it for each request (`x-fal-request-id`), the queue worker for each queued request
it runs; tasks and threads started meanwhile inherit it (contextvars). A log-record factory, rather
than a filter, tags the records: it sees every record of every logger, whatever handlers Ray, Serve
or a test attached, so no line of a request is missed.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

REQUEST_ID: ContextVar[str | None] = ContextVar("fal_request_id", default=None)
RECORD_ATTR = "fal_request_id"  # also set on the record, for structured (JSON) handlers


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


def current_request_id() -> str | None:
    return REQUEST_ID.get()


def install() -> None:
    """Prefix every log record created inside a request with `[<request id>] ` (idempotent)."""
    base = logging.getLogRecordFactory()
    if getattr(base, "tags_fal_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        request_id = REQUEST_ID.get()
        setattr(record, RECORD_ATTR, request_id)
        if request_id is not None:
            record.msg = f"[{request_id}] {record.msg}"  # no '%' in a uuid: the args still format
        return record

    factory.tags_fal_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
