"""Runs queued requests: every ingress replica claims work from the shared store.

Per running request a sidecar loop moves its logs into the store, watches for a cancel flag set
by any replica, and renews the lease. A replica that stops (killed, scaled down) stops renewing;
another replica puts the request back in the queue when the lease runs out and runs it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from api.queue_schemas import ENDPOINTS, LogEntry, WebhookBody
from api.schemas import ImageToImageInput, Output, TextToImageInput
from server.errors import ServiceError
from server.periodic import every
from server.queue.payloads import Payloads
from server.queue.store import CANCELLED, Completion, RequestRecord, RequestStore
from server.queue.webhooks import deliver_webhook
from server.service import FalInput, SRPOService
from settings import Settings

logger = logging.getLogger(__name__)

SIDECAR_INTERVAL_S = 0.2
IDLE_POLL_S = 0.5


def parse_input(endpoint: str, data: dict[str, Any]) -> FalInput:
    return (ImageToImageInput if endpoint == ENDPOINTS[1] else TextToImageInput).model_validate(data)


class QueueWorker:
    def __init__(self, store: RequestStore, service: SRPOService, settings: Settings) -> None:
        self.store = store
        self.service = service
        self.settings = settings
        self.payloads = Payloads(service.storage, settings.payload_inline_max_bytes)
        self.worker_id = uuid.uuid4().hex
        self._running: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()  # webhook deliveries
        self._wake = asyncio.Event()
        self._change = asyncio.Event()  # replaced on every change; waiters hold the old one
        self._loop_task: asyncio.Task | None = None
        self._sweep_task: asyncio.Task | None = None

    def start(self) -> None:
        if self._loop_task is None:
            loop = asyncio.get_running_loop()
            self._loop_task = loop.create_task(self._loop())
            self._sweep_task = loop.create_task(every(
                self.settings.storage_sweep_interval_s, lambda: self.payloads.sweep(self.store), "payload sweep"))

    async def stop(self) -> None:
        """Stop without completing running requests: their leases run out and they run elsewhere."""
        tasks = [t for t in [self._loop_task, self._sweep_task, *self._running.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=self.settings.webhook_timeout_s)

    def wake(self) -> None:
        self._wake.set()

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return when this replica changed a record (or after `timeout_s`: other replicas' changes
        are only seen by polling the store)."""
        try:
            await asyncio.wait_for(self._change.wait(), timeout_s)
        except TimeoutError:
            pass

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def _loop(self) -> None:
        next_sweep = 0.0
        while True:
            try:
                if time.monotonic() >= next_sweep:
                    requeued = await self.store.requeue_expired()
                    if requeued:
                        logger.warning("re-queued %d request(s) whose replica stopped", len(requeued))
                    next_sweep = time.monotonic() + self.settings.queue_lease_s / 3
                while len(self._running) < self.settings.queue_concurrency:
                    record = await self.store.claim(self.worker_id, self.settings.queue_lease_s)
                    if record is None:
                        break
                    self._changed()
                    task = asyncio.get_running_loop().create_task(self._execute(record))
                    self._running[record.id] = task
                    task.add_done_callback(lambda _, rid=record.id: self._finished(rid))
            except Exception:
                logger.exception("queue worker loop failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
            except TimeoutError:
                pass
            self._wake.clear()

    def _finished(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        self._wake.set()

    async def _execute(self, record: RequestRecord) -> None:
        loop = asyncio.get_running_loop()
        pending_logs: list[LogEntry] = []

        def log(message: str) -> None:  # called from the event loop or from a worker thread
            entry = LogEntry(message=message)
            loop.call_soon_threadsafe(pending_logs.append, entry)

        if record.logs:
            log("Restarted: the replica that was running this request stopped")
        began = time.perf_counter()

        async def run_request() -> Output:
            body = parse_input(record.endpoint, await self.payloads.load_input(record))
            return await self.service.run(body, record.base_url, log, record.output_ttl_s)

        run = loop.create_task(run_request())
        cancelled_by_user = False
        next_renew = time.monotonic() + self.settings.queue_lease_s / 3
        try:
            while not run.done():
                await asyncio.wait({run}, timeout=SIDECAR_INTERVAL_S)
                try:
                    await self._flush(record.id, pending_logs)
                    if not run.done() and await self.store.cancel_requested(record.id):
                        cancelled_by_user = True
                        run.cancel()
                    if time.monotonic() >= next_renew and not run.done():
                        next_renew = time.monotonic() + self.settings.queue_lease_s / 3
                        if not await self.store.renew(record.id, self.worker_id, self.settings.queue_lease_s):
                            logger.warning("lost the lease on %s; another replica runs it", record.id)
                            run.cancel()
                            return
                except Exception:  # the store is briefly unreachable: keep running, retry next tick
                    logger.exception("queue sidecar failed for %s", record.id)
        finally:
            if not run.done():  # this replica is stopping
                run.cancel()
        completion = await self._completion(run, cancelled_by_user, time.perf_counter() - began)
        await asyncio.sleep(0)  # let thread-posted log entries land
        await self._flush(record.id, pending_logs)
        await self.store.complete(record.id, await self.payloads.store_result(record.id, completion))
        self._changed()
        self.notify(record, completion)

    async def _completion(self, run: asyncio.Task, cancelled_by_user: bool, seconds: float) -> Completion:
        try:
            output = await run
        except asyncio.CancelledError:
            if not cancelled_by_user:
                raise  # the replica is stopping: leave the record for another replica
            return CANCELLED
        except ServiceError as exc:
            return Completion(code=exc.status_code, body={"detail": exc.detail}, error=str(exc.detail),
                              error_type=exc.error_type, inference_time=seconds)
        except Exception:
            logger.exception("queued request failed")
            return Completion(code=500, body={"detail": "Internal server error"}, error="Internal server error",
                              error_type="internal_error", inference_time=seconds)
        return Completion(code=200, body=output.model_dump(mode="json"), inference_time=seconds)

    async def _flush(self, request_id: str, pending_logs: list[LogEntry]) -> None:
        if pending_logs:
            entries = pending_logs[:]
            del pending_logs[: len(entries)]
            await self.store.append_logs(request_id, entries)
            self._changed()

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
