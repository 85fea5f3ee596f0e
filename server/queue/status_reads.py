"""Status reads whose cost follows what changed, not how often clients ask.

fal's Python client asks for a waiting request's status 0.1 s after each answer; the JS client
every 0.5 s or over a stream. A repeated ask (same request and `logs` flag, within
REPEAT_WINDOW_S of the previous answer) whose answer has not changed is held until the store
announces a change or `hold_s` passes: a long poll. The client gets the same answers, only fewer
repeats of them, and one ask on its own is answered at once. A change of queue position alone is
answered at most every POSITION_GAP_S (positions move with every claim), and the held reads a
queue move wakes refresh their positions together: one store read per BATCH_WINDOW_S for all of
them, not one per held read (hundreds of waiting clients, woken by every claim). A reader watches
its request from before it reads it, so a change between the read and the hold is never missed. Log
entries are read from the store from where this process's copy ends.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from api.queue_schemas import APP_ALIAS, LogEntry
from server.queue.store import Change, RequestRecord, RequestStore, Watch

REPEAT_WINDOW_S = 1.0
POSITION_GAP_S = 0.3
BATCH_WINDOW_S = 0.05  # positions asked for within this long of each other come from one store read
REMEMBERED = 20_000  # requests whose last answer and logs this process keeps (least recent go first)


def status_body(record: RequestRecord, base: str, logs: bool) -> dict[str, Any]:
    """The status body: `QueueStatus.body()`'s JSON, keys in its order, built as a plain dict because
    every poll pays for it and the models cost a third of a status read's own work (issue 25);
    tests/test_status_body.py holds the two equal."""
    url = f"{base}/queue/{APP_ALIAS}/requests/{record.id}"
    body: dict[str, Any] = {"request_id": record.id, "response_url": url, "status_url": f"{url}/status",
                            "cancel_url": f"{url}/cancel", "status": record.status}
    if record.status == "IN_QUEUE":
        if record.queue_position is not None:
            body["queue_position"] = record.queue_position
    elif logs:
        body["logs"] = [entry.model_dump(mode="json") for entry in record.logs]
    if record.status == "COMPLETED" and record.inference_time is not None:
        body["metrics"] = {"inference_time": float(record.inference_time)}
    if record.error is not None:
        body["error"] = record.error
    if record.error_type is not None:
        body["error_type"] = record.error_type
    if record.status != "IN_QUEUE" and not logs:
        body["logs"] = None  # a plain subscribe() breaks without the key
    return body


@dataclass
class _Answer:
    body: dict[str, Any]
    at: float


class _Recent(OrderedDict):
    def remember(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > REMEMBERED:
            self.popitem(last=False)


class _PositionReads:
    """Batches position reads: the first ask opens a batch, which is read from the store
    BATCH_WINDOW_S later with every id asked for meanwhile."""

    def __init__(self, store: RequestStore) -> None:
        self.store = store
        self._batch: tuple[set[str], asyncio.Future] | None = None
        self._reading: asyncio.Task | None = None  # held so the task is not collected mid-read

    async def get(self, request_id: str) -> int | None:
        """The request's queue position, or None when it no longer waits."""
        if self._batch is None:
            done = asyncio.get_running_loop().create_future()
            done.add_done_callback(lambda f: f.cancelled() or f.exception())  # no waiter left is fine
            self._batch = (set(), done)
            self._reading = asyncio.ensure_future(self._read())
        ids, done = self._batch
        ids.add(request_id)
        return (await asyncio.shield(done)).get(request_id)

    async def _read(self) -> None:
        await asyncio.sleep(BATCH_WINDOW_S)
        ids, done = self._batch
        self._batch = None
        try:
            done.set_result(await self.store.positions(sorted(ids)))
        except Exception as exc:  # every waiter of the batch gets the store's error
            done.set_exception(exc)


class StatusReads:
    def __init__(self, store: RequestStore, hold_s: float) -> None:
        self.store = store
        self.hold_s = hold_s
        self._logs: _Recent = _Recent()  # request id -> its log entries so far
        self._answers: _Recent = _Recent()  # (request id, logs flag) -> the last answer
        self._positions = _PositionReads(store)

    async def read(self, request_id: str, with_logs: bool) -> RequestRecord | None:
        record = await self.store.get(request_id, logs=False)
        if record is not None and with_logs and record.status != "IN_QUEUE":
            entries: list[LogEntry] = self._logs.get(request_id, [])
            entries = entries + await self.store.logs_from(request_id, len(entries))
            self._logs.remember(request_id, entries)
            record.logs = entries
        return record

    async def wait(self, watch: Watch, record: RequestRecord, timeout_s: float, answered_at: float) -> Change | None:
        """Wait for a change of the request since `record` was read (up to `timeout_s`); what changed, or None."""
        watch.follow_queue(record.status == "IN_QUEUE")
        change = await watch.next(timeout_s)
        if change == "queue":  # coalesced: a few answers a second, however fast the queue moves
            await asyncio.sleep(max(0.0, min(answered_at + POSITION_GAP_S - time.monotonic(), timeout_s)))
        return change

    async def answer(self, request_id: str, base: str, with_logs: bool) -> tuple[RequestRecord, dict] | None:
        """The record and its status body, held while a repeated ask would get the same answer."""
        with self.store.watch(request_id) as watch:
            record = await self.read(request_id, with_logs)
            if record is None:
                return None
            body = status_body(record, base, with_logs)
            key = (request_id, with_logs)
            before: _Answer | None = self._answers.get(key)
            now = time.monotonic()
            if (self.hold_s > 0 and before is not None and before.body == body and record.status != "COMPLETED"
                    and now - before.at <= REPEAT_WINDOW_S):
                deadline = now + self.hold_s
                while (left := deadline - time.monotonic()) > 0:
                    if not (change := await self.wait(watch, record, left, before.at)):
                        break
                    if change == "queue" and record.status == "IN_QUEUE":
                        # A waiting request's answer is its status and position: when it still waits,
                        # the batched position is all there is to read.
                        position = await self._positions.get(request_id)
                        if position == record.queue_position:
                            continue
                        if position is not None:
                            record.queue_position = position
                            body = {**body, "queue_position": position}
                            break
                    record = await self.read(request_id, with_logs)
                    if record is None:
                        return None
                    body = status_body(record, base, with_logs)
                    if body != before.body:
                        break
        self._answers.remember(key, _Answer(body, time.monotonic()))
        return record, body
