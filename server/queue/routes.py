"""fal's queue routes under /queue: submit, status (polled and streamed), result, cancel."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.queue_schemas import APP_ALIAS, ENDPOINTS, CancelResponse, QueueStatus, QueueUrls, SubmitResponse
from api.schemas import REQUEST_ID_HEADER, ImageToImageInput, TextToImageInput
from server.headers import FalHeaders
from server.logging_context import current_request_id
from server.outbound import BlockedDestination, check_destination
from server.queue.status_reads import StatusReads, status_body
from server.queue.store import CANCELLED, NewRequest, RequestRecord
from server.queue.webhooks import WEBHOOK_SETTING
from server.queue.worker import QueueWorker
from server.service import FalInput
from server.string_route import StringParamsRoute

STREAM_CHECK_S = 5.0  # a stream looks at the store at least this often (notifications wake it sooner)
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
MAX_QUEUE_LENGTH = Query(None, ge=0, description="429 (nothing queued) when this many requests already wait.")


def _logs_flag(logs: str | None) -> bool:
    return (logs or "0").lower() in ("1", "true", "yes")


def queue_router(worker: QueueWorker, base_url) -> APIRouter:
    """`base_url(request)` is the scheme and host the client used."""
    store, settings, payloads = worker.store, worker.settings, worker.payloads
    reads = StatusReads(store, settings.queue_status_hold_s)
    router = APIRouter(prefix="/queue")

    def by_id(method: str, path: str, **kwargs: Any) -> Callable[[Endpoint], Endpoint]:
        """A route of one request (status, result, cancel): polled by every waiting client, so its
        string parameters skip FastAPI's per-request solving (server/string_route.py)."""
        def add(endpoint: Endpoint) -> Endpoint:
            router.add_api_route(f"/{APP_ALIAS}/requests/{{request_id}}{path}", endpoint, methods=[method],
                                 route_class_override=StringParamsRoute, **kwargs)
            return endpoint
        return add

    async def submit(endpoint: str, body: FalInput, request: Request, fal_webhook: str | None,
                     max_queue_length: int | None, headers: FalHeaders) -> JSONResponse:
        worker.service.check(body)  # this deployment's limits: a 422 now, not a failed request later
        if fal_webhook is not None:
            try:
                await check_destination(fal_webhook, settings.webhook_allowed_networks, WEBHOOK_SETTING)
            except BlockedDestination as exc:
                raise HTTPException(422, [{"loc": ["query", "fal_webhook"], "msg": str(exc),
                                           "type": "value_error", "input": fal_webhook}]) from exc
        base = base_url(request)
        request_id = current_request_id() or str(uuid.uuid4())  # the id the submit's log lines carry
        data, input_ref = await payloads.store_input(request_id, body.model_dump(mode="json"))
        new = NewRequest(id=request_id, endpoint=endpoint, input=data, input_ref=input_ref, sync_mode=body.sync_mode,
                         output_ttl_s=headers.output_ttl_s, start_timeout_s=headers.start_timeout_s,
                         retry=headers.retry, priority=headers.priority, base_url=base, webhook_url=fal_webhook)
        limit = settings.queue_max_pending if max_queue_length is None else min(settings.queue_max_pending,
                                                                                 max_queue_length)
        try:
            position = await store.enqueue(new, limit)
        except store.unreachable:  # nothing was stored: the app answers 503, the client retries
            await payloads.delete([input_ref] if input_ref else [])
            raise
        if position is None:  # nothing was stored: a client's retry cannot double the work
            await payloads.delete([input_ref] if input_ref else [])
            detail = "The queue is full (SRPO_QUEUE_MAX_PENDING, or the request's fal_max_queue_length); retry later"
            return JSONResponse({"detail": detail}, status_code=429,
                                headers={"Retry-After": "5"})
        worker.wake()
        response = SubmitResponse(**QueueUrls.for_request(base, new.id).model_dump(), queue_position=position)
        return JSONResponse(response.model_dump(mode="json"), headers={REQUEST_ID_HEADER: new.id})

    @router.post(f"/{ENDPOINTS[0]}", response_model=SubmitResponse, summary="Queue a text-to-image request")
    async def submit_text_to_image(body: TextToImageInput, request: Request, fal_webhook: str | None = Query(None),
                                   fal_max_queue_length: int | None = MAX_QUEUE_LENGTH,
                                   headers: FalHeaders = Depends()) -> JSONResponse:
        return await submit(ENDPOINTS[0], body, request, fal_webhook, fal_max_queue_length, headers)

    @router.post(f"/{ENDPOINTS[1]}", response_model=SubmitResponse, summary="Queue an image-to-image request")
    async def submit_image_to_image(body: ImageToImageInput, request: Request, fal_webhook: str | None = Query(None),
                                    fal_max_queue_length: int | None = MAX_QUEUE_LENGTH,
                                    headers: FalHeaders = Depends()) -> JSONResponse:
        return await submit(ENDPOINTS[1], body, request, fal_webhook, fal_max_queue_length, headers)

    async def known(request_id: str) -> RequestRecord:
        record = await store.get(request_id, logs=False)
        if record is None:
            raise HTTPException(404, f"Request {request_id} not found")
        return record

    @by_id("GET", "/status", response_model=QueueStatus, summary="A queued request's status (202 until it completes)")
    async def status(request_id: str, request: Request, logs: str | None = None) -> JSONResponse:
        answered = await reads.answer(request_id, base_url(request), _logs_flag(logs))
        if answered is None:
            raise HTTPException(404, f"Request {request_id} not found")
        record, body = answered
        return JSONResponse(body, status_code=200 if record.status == "COMPLETED" else 202,
                            headers={REQUEST_ID_HEADER: request_id})

    @by_id("GET", "/status/stream", summary="Status as server-sent events")
    async def status_stream(request_id: str, request: Request, logs: str | None = None) -> StreamingResponse:
        await known(request_id)
        base, with_logs = base_url(request), _logs_flag(logs)

        async def events() -> AsyncIterator[str]:
            sent_logs, last, sent_at = 0, None, 0.0
            with store.watch(request_id) as watch:
                while True:
                    record = await reads.read(request_id, with_logs)
                    if record is None:  # expired while streaming
                        return
                    new_logs = record.logs[sent_logs:]
                    key = (record.status, record.queue_position, len(record.logs) if with_logs else 0)
                    if key != last:
                        # Each event carries only the entries new since the previous one.
                        record.logs = new_logs
                        yield f"data: {json.dumps(status_body(record, base, with_logs))}\n\n"
                        sent_logs, last, sent_at = sent_logs + len(new_logs), key, time.monotonic()
                    if record.status == "COMPLETED":
                        return
                    await reads.wait(watch, record, STREAM_CHECK_S, sent_at)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={REQUEST_ID_HEADER: request_id, "Cache-Control": "no-cache"})

    @by_id("GET", "", summary="A completed request's result")
    async def result(request_id: str) -> JSONResponse:
        record = await known(request_id)
        if record.status != "COMPLETED":
            raise HTTPException(400, "Request is still in progress")
        result = await payloads.load_result(record)
        if record.result_code == 200 and record.sync_mode:
            await store.delete(request_id)  # sync_mode results are not kept in the request history
            await payloads.delete(record.payload_refs())
        return JSONResponse(result, status_code=record.result_code or 500,
                            headers={REQUEST_ID_HEADER: request_id, **(record.result_headers or {})})

    @by_id("PUT", "/cancel", response_model=CancelResponse, summary="Cancel a queued or running request")
    async def cancel(request_id: str) -> JSONResponse:
        outcome = await store.cancel(request_id)
        if outcome == "unknown":
            raise HTTPException(404, f"Request {request_id} not found")
        if outcome == "completed":
            return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
        if outcome == "removed" and (record := await store.get(request_id, logs=False)) is not None:
            worker.notify(record, CANCELLED)
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    return router
