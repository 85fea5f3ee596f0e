"""The status body built as a plain dict (every poll pays for it) is byte for byte what the
documented model, `QueueStatus`, renders for every kind of record."""

from __future__ import annotations

import itertools

from fastapi.responses import JSONResponse

from api.queue_schemas import LogEntry, QueueStatus, QueueUrls
from server.queue.status_reads import status_body
from server.queue.store import RequestRecord

BASE = "https://srpo.example:8443"


def _from_the_model(record: RequestRecord, logs: bool) -> dict:
    metrics = None
    if record.status == "COMPLETED" and record.inference_time is not None:
        metrics = {"inference_time": record.inference_time}
    return QueueStatus(
        **QueueUrls.for_request(BASE, record.id).model_dump(),
        status=record.status,
        queue_position=record.queue_position if record.status == "IN_QUEUE" else None,
        logs=record.logs if logs and record.status != "IN_QUEUE" else None,
        metrics=metrics,
        error=record.error,
        error_type=record.error_type,
    ).body()


def _records():
    entries = [LogEntry(message="step 1/2"), LogEntry(message="caf\u00e9 \u2603", level="WARNING")]
    for status, position, logs, time_, error in itertools.product(
            ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"), (None, 0, 7), ([], entries), (None, 2, 1.25),
            (None, ("Request was cancelled", "cancelled"))):
        record = RequestRecord(id="req-1", endpoint="fal-ai/flux/srpo", input={}, base_url="http://ignored",
                               status=status, queue_position=position, logs=logs, inference_time=time_)
        if error:
            record.error, record.error_type = error
        yield record


def test_the_plain_status_body_is_the_models_json():
    checked = 0
    for record in _records():
        for logs in (False, True):
            expected = _from_the_model(record, logs)
            body = status_body(record, BASE, logs)
            assert JSONResponse(body).body == JSONResponse(expected).body, (record, logs)
            checked += 1
    assert checked == 3 * 3 * 2 * 3 * 2 * 2
