"""The queue's own guards, through the real HTTP app and store: a request whose replicas keep dying
ends with an error, a start timeout is fal's 504, a run past its deadline is a 504 too, and a worker
stopped while its claim is on the way hands the claimed request back."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from models.pipeline import SRPOPipeline
from server.app import build_app
from server.queue.store import NewRequest, RequestRecord, SqliteRequestStore
from server.queue.worker import QueueWorker
from server.service import InProcessBackend, SRPOService
from settings import Settings, get_settings
from tests.conftest import CPU
from tests.gate import gate_server
from tests.harness import wait_until

T2I = "fal-ai/flux/srpo"
I2I = f"{T2I}/image-to-image"
REQUESTS = "/queue/fal-ai/flux/requests"
BODY = {"prompt": "a red fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "seed": 1}


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tiny_safety_dir) -> SRPOPipeline:
    return SRPOPipeline(tiny_model_dir, tiny_safety_dir, CPU, torch.float32)


def _settings(tmp_path: Path, **update) -> Settings:
    return get_settings().model_copy(update={"storage_dir": tmp_path / "files",
                                             "queue_db_path": tmp_path / "requests.sqlite3", **update})


def _completed(client: TestClient, request_id: str) -> dict:
    status: dict = {}

    def done() -> bool:
        nonlocal status
        status = client.get(f"{REQUESTS}/{request_id}/status").json()
        return status["status"] == "COMPLETED"

    wait_until(done, 60, f"{request_id} to complete")
    return status


def test_a_request_whose_replicas_keep_dying_ends_with_an_error(pipeline, tmp_path):
    settings = _settings(tmp_path, queue_max_attempts=2)
    request_id = str(uuid.uuid4())

    async def crash_twice() -> None:  # two replicas claim it and die (their leases run out)
        store = SqliteRequestStore(settings.queue_db_path, settings.result_ttl_s)
        await store.enqueue(NewRequest(id=request_id, endpoint=T2I, input=BODY, base_url="http://x"), 10)
        for replica in ("dead-1", "dead-2"):
            assert (await store.claim(replica, lease_s=0.01)).id == request_id
            await asyncio.sleep(0.02)
            assert await store.requeue_expired() == [request_id]
        await store.close()

    asyncio.run(crash_twice())
    with TestClient(build_app(SRPOService(InProcessBackend(pipeline), settings))) as client:
        status = _completed(client, request_id)
        assert status["error_type"] == "runner_disconnected" and "SRPO_QUEUE_MAX_ATTEMPTS" in status["error"], status
        assert client.get(f"{REQUESTS}/{request_id}").status_code == 503
        # A request that is not poisoned still runs: the worker goes on.
        fresh = client.post(f"/queue/{T2I}", json=BODY).json()["request_id"]
        assert "error" not in _completed(client, fresh)


def test_start_timeout_and_request_deadline_are_504s(pipeline, tmp_path):
    settings = _settings(tmp_path, queue_concurrency=1, request_timeout_s=1.0,
                         image_url_allowed_networks=["127.0.0.1/32"])
    # The gate stays shut: a request held there outlasts its deadline on any machine.
    with gate_server() as gate, TestClient(build_app(SRPOService(InProcessBackend(pipeline), settings))) as client:
        blocker = client.post(f"/queue/{I2I}", json=gate.held_body()).json()["request_id"]
        waiting = client.post(f"/queue/{T2I}", json=BODY, headers={"X-Fal-Request-Timeout": "0.5"})
        waiting = waiting.json()["request_id"]

        status = _completed(client, blocker)  # ran past SRPO_REQUEST_TIMEOUT_S
        assert status["error_type"] == "request_timeout" and "SRPO_REQUEST_TIMEOUT_S" in status["error"], status
        status = _completed(client, waiting)  # started only after its 0.5 s had passed
        assert status["error_type"] == "request_timeout", status
        result = client.get(f"{REQUESTS}/{waiting}")
        assert result.status_code == 504 and result.headers["x-fal-request-timeout-type"] == "user"

        began = time.monotonic()
        sync = client.post(f"/{I2I}", json=gate.held_body())
        assert sync.status_code == 504 and time.monotonic() - began < 10, sync.text  # cut at 1 s, not the gate's 60
        bad = client.post(f"/queue/{T2I}", json=BODY, headers={"X-Fal-Request-Timeout": "soon"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "x-fal-request-timeout"]


class SlowAnswers(SqliteRequestStore):
    """The embedded store whose claims commit at once but answer only when `answer` is set (a busy
    store, a slow network to Redis)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.committed, self.answer = asyncio.Event(), asyncio.Event()

    async def claim(self, worker: str, lease_s: float) -> RequestRecord | None:
        record = await super().claim(worker, lease_s)
        if record is not None:
            self.committed.set()
            await self.answer.wait()
        return record


def test_a_worker_stopped_while_its_claim_is_on_the_way_hands_the_request_back(pipeline, tmp_path):
    settings = _settings(tmp_path, queue_drain_s=0)
    request_id = str(uuid.uuid4())

    async def scenario() -> None:
        store = SlowAnswers(settings.queue_db_path, settings.result_ttl_s)
        await store.enqueue(NewRequest(id=request_id, endpoint=T2I, input=BODY, base_url="http://x"), 10)
        worker = QueueWorker(store, SRPOService(InProcessBackend(pipeline), settings), settings)
        worker.start()
        await asyncio.wait_for(store.committed.wait(), 30)  # the store holds it as the worker's now
        stopping = asyncio.get_running_loop().create_task(worker.stop())
        await asyncio.sleep(0)  # the stop begins before the claim's answer arrives
        store.answer.set()
        await asyncio.wait_for(stopping, 30)
        record = await store.get(request_id)
        # Back at the head at once, not held by a stopped worker until its lease runs out.
        assert (record.status, record.queue_position) == ("IN_QUEUE", 0), record
        await store.close()

    asyncio.run(scenario())
