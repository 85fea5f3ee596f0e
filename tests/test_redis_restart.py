"""Nothing accepted is lost when the queue's Redis restarts: every request completes, exactly once."""

from __future__ import annotations

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi.testclient import TestClient

from models.pipeline import SRPOPipeline
from server.app import build_app
from server.service import InProcessBackend, SRPOService
from settings import get_settings
from tests.conftest import CPU
from tests.harness import free_port, running_serve, start_redis, tiny_env, wait_until
from tests.queue_helpers import REQUESTS, denoised_samples, step_logs, wait_status

T2I = "fal-ai/flux/srpo"
STEPS = 20


def body(i: int) -> dict[str, Any]:
    return {"prompt": f"redis restart {i}", "seed": i, "image_size": {"width": 256, "height": 256},
            "num_inference_steps": STEPS}


class _Webhooks(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        return None


def test_a_restarted_redis_loses_no_request_and_runs_none_twice(tiny_root, tmp_path):
    port, folder = free_port(), tmp_path / "redis"
    folder.mkdir()
    redis_server = start_redis(port, folder)
    hooks = ThreadingHTTPServer(("127.0.0.1", 0), _Webhooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    webhook = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    env = tiny_env(tiny_root, tmp_path, SRPO_REDIS_URL=f"redis://127.0.0.1:{port}/0",
                   SRPO_WEBHOOK_ALLOWED_NETWORKS='["127.0.0.1/32"]', SRPO_QUEUE_CONCURRENCY="2")
    try:
        with running_serve(env) as base, httpx.Client(base_url=base, timeout=60) as client:
            before = denoised_samples()
            ids = [client.post(f"/queue/{T2I}", params={"fal_webhook": webhook},
                               json=body(i)).json()["request_id"] for i in range(6)]
            wait_status(client, ids[0], lambda b: len(step_logs(b)) >= 1)
            redis_server.send_signal(signal.SIGTERM)  # a clean shutdown writes the append-only file
            redis_server.wait(timeout=30)
            time.sleep(1.0)  # the outage itself: the replicas keep running their requests meanwhile
            redis_server = start_redis(port, folder)
            for request_id in ids:
                status = wait_status(client, request_id, lambda b: b["status"] == "COMPLETED", timeout_s=180)
                assert "error" not in status, status
                assert client.get(f"{REQUESTS}/{request_id}").status_code == 200
            wait_until(lambda: len(_Webhooks.received) >= len(ids), 30, "every webhook")
            delivered = [hook["request_id"] for hook in _Webhooks.received]
            assert sorted(delivered) == sorted(ids), delivered  # each completed exactly once
            assert denoised_samples() - before == len(ids) * STEPS  # and each was denoised once
    finally:
        hooks.shutdown()
        redis_server.terminate()
        redis_server.wait(timeout=10)


def test_a_submit_that_cannot_reach_redis_is_503_with_retry_after(tiny_model_dir, tmp_path):
    """Nothing was stored, so the answer is fal's overload answer (503 with Retry-After, which the JS
    client retries), not a 500. Redis is a port nothing listens on."""
    settings = get_settings().model_copy(update={"storage_dir": tmp_path / "files",
                                                 "redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    pipeline = SRPOPipeline(tiny_model_dir, None, CPU, torch.float32)
    with TestClient(build_app(SRPOService(InProcessBackend(pipeline), settings))) as client:
        refused = client.post(f"/queue/{T2I}", json=body(0))
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5"
        assert refused.headers["x-fal-error-type"] == refused.json()["error_type"] == "store_unavailable"


def test_while_redis_is_down_reads_are_503_and_the_request_accepted_before_completes(tiny_model_dir, tmp_path):
    """An in-process app on a real Redis that stops and starts again: while it is down a read is 503
    (nothing was lost, the client retries); once it is back, the request accepted before the outage
    completes, and the app still shuts down (its worker stop does not hang on the restarted Redis)."""
    port, folder = free_port(), tmp_path / "redis"
    folder.mkdir()
    redis_server = start_redis(port, folder)
    settings = get_settings().model_copy(update={"storage_dir": tmp_path / "files",
                                                 "redis_url": f"redis://127.0.0.1:{port}/0"})
    pipeline = SRPOPipeline(tiny_model_dir, None, CPU, torch.float32)
    small = {**body(0), "num_inference_steps": 2}
    try:
        with TestClient(build_app(SRPOService(InProcessBackend(pipeline), settings))) as client:
            accepted = client.post(f"/queue/{T2I}", json=small)
            assert accepted.status_code == 200, accepted.text
            status_url, result_url = accepted.json()["status_url"], accepted.json()["response_url"]
            redis_server.send_signal(signal.SIGTERM)
            redis_server.wait(timeout=30)
            assert client.get(status_url).status_code == 503
            redis_server = start_redis(port, folder)
            wait_until(lambda: client.get(status_url).json()["status"] == "COMPLETED", 120,
                       "the request accepted before the outage")
            assert len(client.get(result_url).json()["images"]) == 1
    finally:
        redis_server.terminate()
        redis_server.wait(timeout=30)
