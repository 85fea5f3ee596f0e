"""Runs queued requests: every ingress replica claims work from the shared store.

Per running request a sidecar loop moves its logs into the store, watches for a cancel flag set
by any replica, and renews the lease. A replica that dies stops renewing; another replica puts the
request back in the queue when the lease runs out and runs it again. A replica that is stopped
(downscale, upgrade) stops claiming, lets running requests finish for `queue_drain_s` (their logs
say so), and hands the rest back to the head of the queue at once. Only the lease holder may log
or complete, so a late worker never overwrites a result or sends a second webhook; a request
claimed more than `queue_max_attempts` times ends with an error instead of going round forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Iterable, TypeVar

from api.queue_schemas import ENDPOINTS, LogEntry, WebhookBody
from api.schemas import ImageToImageInput, Output, TextToImageInput
from server.errors import ServiceError, default_error_type
from server.logging_context import request_context
from server.periodic import every
from server.queue.payloads import Payloads
from server.queue.store import CANCELLED, Completion, RequestRecord, RequestStore
from server.queue.webhooks import deliver_webhook
from server.service import FalInput, SRPOService
from server.telemetry import ENDPOINT_NAMES
from settings import Settings

logger = logging.getLogger(__name__)

SIDECAR_INTERVAL_S = 0.2
IDLE_POLL_S = 0.5
ROOM_POLL_S = 0.05  # while the backend has no room, how often to look again (an in-process check)
STORE_OUTAGE_S = 300.0  # how long a finished request waits for an unreachable store before giving up
TIMEOUT_TYPE_HEADER = "X-Fal-Request-Timeout-Type"
T = TypeVar("T")


def parse_input(endpoint: str, data: dict[str, Any]) -> FalInput:
    return (ImageToImageInput if endpoint == ENDPOINTS[1] else TextToImageInput).model_validate(data)


def error_completion(
    exc: ServiceError, seconds: float | None = None, headers: dict[str, str] | None = None
) -> Completion:
    return Completion(code=exc.status_code, body={"detail": exc.detail, "error_type": exc.error_type},
                      error=str(exc.detail),
                      error_type=exc.error_type, inference_time=seconds, headers=headers)


class QueueWorker:
    def __init__(self, store: RequestStore, service: SRPOService, settings: Settings) -> None:
        self.store = store
        self.service = service
        self.settings = settings
        self.telemetry = service.telemetry
        self.payloads = Payloads(service.storage, settings.payload_inline_max_bytes)
        self.worker_id = uuid.uuid4().hex
        self._running: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()  # webhook deliveries
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._sweep_task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        if self._loop_task is None:
            loop = asyncio.get_running_loop()
            self._loop_task = loop.create_task(self._loop())
            self._sweep_task = loop.create_task(every(
                self.settings.storage_sweep_interval_s, lambda: self.payloads.sweep(self.store), "payload sweep"))

    async def stop(self) -> None:
        """Stop claiming; give running requests `queue_drain_s` to finish, then hand the rest back."""
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        if self._loop_task is not None:
            # Asked to end, not cancelled: a claim cut off after the store committed it would hold a
            # request that nobody runs until its lease ran out. A loop task of another event loop (an
            # app whose lifespan ends elsewhere, as some test transports do) cannot be awaited here.
            self._stopping = True
            self._wake.set()
            if self._loop_task.get_loop() is asyncio.get_running_loop():
                await self._loop_task
            else:
                self._loop_task.cancel()
        running = dict(self._running)
        if running:
            logger.info("stopping: %d running request(s) have %g s to finish here (SRPO_QUEUE_DRAIN_S)",
                        len(running), self.settings.queue_drain_s)
            await self._tell(running, f"This replica is stopping: the request has {self.settings.queue_drain_s:g} s "
                                      "to finish here, else it goes back to the head of the queue (SRPO_QUEUE_DRAIN_S)")
            await asyncio.wait(running.values(), timeout=self.settings.queue_drain_s)
        unfinished = {rid: task for rid, task in running.items() if not task.done()}
        for task in unfinished.values():
            task.cancel()
        await asyncio.gather(*unfinished.values(), return_exceptions=True)
        for request_id in unfinished:
            try:
                if await self.store.release(request_id, self.worker_id):
                    logger.info("handed %s back to the queue: this replica is stopping", request_id)
            except Exception:  # the lease still runs out and another replica takes it
                logger.exception("could not hand %s back to the queue", request_id)
        if self._background:
            await asyncio.wait(self._background, timeout=self.settings.webhook_timeout_s)

    async def _tell(self, request_ids: Iterable[str], message: str) -> None:
        for request_id in request_ids:
            try:
                await self.store.append_logs(request_id, self.worker_id, [LogEntry(message=message)])
            except Exception:  # a log line is not worth holding the drain up for
                logger.exception("could not log to %s", request_id)

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        next_sweep = next_report = 0.0
        while not self._stopping:
            held = False
            try:
                if time.monotonic() >= next_sweep:
                    requeued = await self.store.requeue_expired()
                    if requeued:
                        logger.warning("re-queued %d request(s) whose replica stopped", len(requeued))
                    next_sweep = time.monotonic() + self.settings.queue_lease_s / 3
                # Work waits in the store, not in front of busy Denoisers: claim only what the backend can
                # start soon, one at a time (a claimed request reaches the backend a moment later).
                if len(self._running) < self.settings.queue_concurrency and self.service.backend.has_room():
                    record = await self.store.claim(self.worker_id, self.settings.queue_lease_s)
                    if record is not None:
                        task = asyncio.get_running_loop().create_task(self._start(record))
                        self._running[record.id] = task
                        task.add_done_callback(lambda _, rid=record.id: self._finished(rid))
                        held = True
                elif len(self._running) < self.settings.queue_concurrency:
                    held = True
                self.telemetry.requests_running("queue", len(self._running))
                if time.monotonic() >= next_report:
                    self.telemetry.requests_waiting(await self.store.pending())
                    next_report = time.monotonic() + IDLE_POLL_S
            except Exception:
                logger.exception("queue worker loop failed; retrying")
            try:  # room opens without a wake-up (a sync request ends, a replica is added): look again soon
                await asyncio.wait_for(self._wake.wait(), ROOM_POLL_S if held else IDLE_POLL_S)
            except TimeoutError:
                pass
            self._wake.clear()

    def _finished(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        self.telemetry.requests_running("queue", len(self._running))
        self._wake.set()

    async def _start(self, record: RequestRecord) -> None:
        """Run a claimed request, unless it has waited past its start timeout or failed too often."""
        with request_context(record.id):  # its log lines carry its id, as the submit's did
            await self._start_in_context(record)

    async def _start_in_context(self, record: RequestRecord) -> None:
        waited = time.time() - record.created_at
        if record.attempts > 1:
            self.telemetry.retried("requeued")
        else:  # a re-claimed request's wait since submission includes its earlier runs
            self.telemetry.queue_wait(waited)
        if record.start_timeout_s is not None and waited > record.start_timeout_s:
            exc = ServiceError(f"Request did not start within its timeout of {record.start_timeout_s:g} s "
                               f"(X-Fal-Request-Timeout); it waited {waited:.1f} s", 504, "request_timeout")
            await self._finish(record, error_completion(exc, headers={TIMEOUT_TYPE_HEADER: "user"}))
        elif record.attempts > self.settings.queue_max_attempts:
            exc = ServiceError(f"Request was started {record.attempts - 1} times and its replica stopped each "
                               f"time (SRPO_QUEUE_MAX_ATTEMPTS)", 503, "runner_disconnected")
            await self._finish(record, error_completion(exc))
        else:
            await self._execute(record)

    async def _execute(self, record: RequestRecord) -> None:
        loop = asyncio.get_running_loop()
        pending_logs: list[LogEntry] = []

        def log(message: str) -> None:  # called from the event loop or from a worker thread
            entry = LogEntry(message=message)
            loop.call_soon_threadsafe(pending_logs.append, entry)

        if record.attempts > 1:
            log(f"Restarted (attempt {record.attempts}): the replica that was running this request stopped")
        began = time.perf_counter()

        async def run_request() -> Output:
            body = parse_input(record.endpoint, await self.payloads.load_input(record))
            return await self.service.run(body, record.base_url, log, record.output_ttl_s, retry=record.retry)

        run = loop.create_task(run_request())
        cancelled_by_user = False
        next_renew = time.monotonic() + self.settings.queue_lease_s / 3
        try:
            while not run.done():
                await asyncio.wait({run}, timeout=SIDECAR_INTERVAL_S)
                try:
                    if not await self._flush(record.id, pending_logs):
                        logger.warning("%s is no longer this replica's; another one runs it", record.id)
                        return
                    if not run.done() and await self.store.cancel_requested(record.id):
                        cancelled_by_user = True
                        run.cancel()
                    if time.monotonic() >= next_renew and not run.done():
                        next_renew = time.monotonic() + self.settings.queue_lease_s / 3
                        if not await self.store.renew(record.id, self.worker_id, self.settings.queue_lease_s):
                            logger.warning("lost the lease on %s; another replica runs it", record.id)
                            return
                except Exception:  # the store is briefly unreachable: keep running, retry next tick
                    logger.exception("queue sidecar failed for %s", record.id)
        finally:
            if not run.done():  # this replica is stopping, or the request is another replica's now
                run.cancel()
        completion = await self._completion(run, cancelled_by_user, time.perf_counter() - began)
        await asyncio.sleep(0)  # let thread-posted log entries land
        await self._until_store_answers(lambda: self._flush(record.id, pending_logs), record.id)
        await self._finish(record, completion)

    async def _finish(self, record: RequestRecord, completion: Completion) -> None:
        stored = await self._until_store_answers(lambda: self.payloads.store_result(record.id, completion), record.id)
        done = await self._until_store_answers(
            lambda: self.store.complete(record.id, stored, worker=self.worker_id), record.id)
        if done:  # a late worker's result is dropped: one completion, one webhook
            self.notify(record, completion)
            failed = completion.code != 200
            error_type = (completion.error_type or default_error_type(completion.code)) if failed else None
            self.telemetry.request_finished(ENDPOINT_NAMES[record.endpoint], "queue",
                                            time.time() - record.created_at, error_type)
        else:
            logger.warning("dropped the result of %s: another replica holds it now", record.id)
            await self.payloads.delete([stored.body_ref] if stored.body_ref else [])

    async def _until_store_answers(self, op: Callable[[], Awaitable[T]], request_id: str) -> T:
        """`op()`, retried while the store (or storage) is unreachable, up to STORE_OUTAGE_S."""
        deadline, wait = time.monotonic() + STORE_OUTAGE_S, 0.2
        while True:
            try:
                return await op()
            except Exception:
                if time.monotonic() + wait > deadline:
                    raise  # the lease runs out and another replica runs the request again
                logger.warning("store unreachable while finishing %s; retrying in %.1f s", request_id, wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 5.0)

    async def _completion(self, run: asyncio.Task, cancelled_by_user: bool, seconds: float) -> Completion:
        try:
            output = await run
        except asyncio.CancelledError:
            if not cancelled_by_user:
                raise  # the replica is stopping: leave the record for another replica
            return CANCELLED
        except ServiceError as exc:
            return error_completion(exc, seconds)
        except Exception:
            logger.exception("queued request failed")
            return Completion(code=500, body={"detail": "Internal server error", "error_type": "internal_error"},
                              error="Internal server error", error_type="internal_error", inference_time=seconds)
        return Completion(code=200, body=output.model_dump(mode="json"), inference_time=seconds)

    async def _flush(self, request_id: str, pending_logs: list[LogEntry]) -> bool:
        """Move pending log entries to the store; False when this replica no longer holds the request."""
        if not pending_logs:
            return True
        entries = pending_logs[:]
        held = await self.store.append_logs(request_id, self.worker_id, entries)
        del pending_logs[: len(entries)]
        return held

    def notify(self, record: RequestRecord, completion: Completion) -> None:
        """Send the completion webhook in the background, if the request asked for one."""
        if record.webhook_url:
            task = asyncio.get_running_loop().create_task(self._send_webhook(record, completion))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_webhook(self, record: RequestRecord, completion: Completion) -> None:
        ok = completion.code == 200
        body = WebhookBody(
            request_id=record.id,
            gateway_request_id=record.id,
            status="OK" if ok else "ERROR",
            payload=completion.body,
            error=None if ok else completion.error,
        )
        await deliver_webhook(record.webhook_url, body, self.settings)
