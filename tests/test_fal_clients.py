"""fal's own clients, unmodified, against a live Serve instance on each data plane (tiny model, embedded
store, API key on).

Python: `fal-client` with its URL formats pointed at plain HTTP (the documented way without TLS).
JavaScript: `@fal-ai/client` in Node, polling, streaming and through the proxy route.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import fal_client
import httpx
import numpy as np
import pytest
from PIL import Image
from ray import serve

from tests.gate import gate_server
from tests.harness import APP_NAME, DATA_PLANES, running_serve, tiny_env
from tests.queue_helpers import (
    APP,
    REQUESTS,
    assert_records_survive_ingress_kill,
    denoised_samples,
    slow,
    small,
    step_logs,
    wait_status,
)

KEY = "test-key-5f1c"
I2I = "fal-ai/flux/srpo/image-to-image"
MAX_PENDING = 3
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
JS_SCRIPT = Path(__file__).parent / "js" / "subscribe.mjs"


@pytest.fixture(scope="module", params=DATA_PLANES)
def server(request, tiny_root, tmp_path_factory):
    env = tiny_env(
        tiny_root, tmp_path_factory.mktemp("state"),
        SRPO_QUEUE_CONCURRENCY="1",  # one queue slot: queued states and positions are deterministic
        SRPO_QUEUE_MAX_PENDING=str(MAX_PENDING),
        SRPO_QUEUE_LEASE_S="3",
        SRPO_WEBHOOK_ALLOWED_NETWORKS='["127.0.0.0/8"]',
        SRPO_WEBHOOK_ATTEMPTS="3",
        SRPO_IMAGE_URL_ALLOWED_NETWORKS='["127.0.0.1/32"]',  # the gate below
        SRPO_IMAGE_FETCH_TIMEOUT_S="60",
    )
    args = {"text_batch_wait_s": 0.0, "decode_batch_wait_s": 0.0}
    with running_serve(env, args, secrets={"SRPO_API_KEYS": json.dumps([KEY])}, data_plane=request.param) as base:
        yield base


@pytest.fixture
def fal(server, monkeypatch):
    """fal_client pointed at the server over plain HTTP, as the README documents."""
    os.environ["FAL_KEY"] = KEY  # read once by the module-level client
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{server}/")
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{server}/queue/")
    return fal_client


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Key {KEY}"}, timeout=30) as client:
        yield client


@pytest.fixture
def gate(http):
    """`hold()` submits a request that holds the one queue slot until `open()` (its image_url answers only
    then), so queued states last as long as a test needs them on any machine; the request id."""
    with gate_server() as gate:
        def hold() -> str:
            request_id = http.post(f"/queue/{I2I}", json=gate.held_body()).json()["request_id"]
            wait_status(http, request_id, lambda b: b["status"] == "IN_PROGRESS")
            return request_id

        yield SimpleNamespace(hold=hold, open=gate.open)


def _fetch_image(url: str) -> Image.Image:
    response = httpx.get(url, timeout=10)  # files need no key: their names are unguessable
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def test_run_both_endpoints(fal):
    out = fal.run(APP, arguments=small(num_images=2))
    assert len(out["images"]) == 2 and out["seed"] == 1 and out["has_nsfw_concepts"] == [False, False]
    assert _fetch_image(out["images"][0]["url"]).size == (256, 256)

    source = Image.fromarray((np.random.RandomState(0).rand(200, 330, 3) * 255).astype(np.uint8))
    out = fal.run(I2I, arguments={"prompt": "same, but blue", "image_url": fal.encode_image(source),
                                  "num_inference_steps": 10, "strength": 0.5, "seed": 3})
    assert (out["images"][0]["width"], out["images"][0]["height"]) == (320, 192)
    assert _fetch_image(out["images"][0]["url"]).size == (320, 192)


def test_subscribe_reports_queue_position_step_logs_and_completion(fal, http, gate):
    blocker = gate.hold()
    updates = []

    def on_update(update) -> None:
        updates.append(update)
        gate.open()  # the client has seen it queued

    # Big enough that it is IN_PROGRESS across several of the client's 0.1 s polls.
    result = fal.subscribe(APP, arguments=small(num_inference_steps=8, image_size="square_hd"), with_logs=True,
                           on_queue_update=on_update)
    assert len(result["images"]) == 1
    kinds = [type(u).__name__ for u in updates]
    assert kinds[0] == "Queued" and updates[0].position == 0, kinds
    assert "InProgress" in kinds and kinds[-1] == "Completed", kinds
    completed = updates[-1]
    messages = [entry["message"] for entry in completed.logs]
    assert [m for m in messages if m.startswith("step ")] == [f"step {i}/8" for i in range(1, 9)]
    for stage in ("Encoding the prompt", "Denoising 1 image(s) at 1024x1024", "Decoding and checking safety"):
        assert stage in messages
    assert {"level", "source", "timestamp"} <= completed.logs[0].keys()
    assert completed.metrics["inference_time"] > 0
    assert fal.result(I2I, blocker)["seed"] == 1


def test_submit_then_status_result_and_cancel_by_id(fal):
    handle = fal.submit(APP, arguments=small(seed=42))
    assert UUID.match(handle.request_id)
    status = fal.status(APP, handle.request_id, with_logs=True)
    assert type(status).__name__ in ("Queued", "InProgress", "Completed")
    result = fal.result(APP, handle.request_id)
    assert result["seed"] == 42 and fal.result(APP, handle.request_id) == result  # readable many times
    done = fal.status(APP, handle.request_id, with_logs=False)
    assert type(done).__name__ == "Completed" and done.logs is None
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        fal.cancel(APP, handle.request_id)
    assert err.value.status_code == 400 and "ALREADY_COMPLETED" in str(err.value)
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        fal.status(APP, "00000000-0000-4000-8000-000000000000")
    assert err.value.status_code == 404


def test_cancelling_a_queued_request_does_no_model_work(fal, http, gate):
    before = denoised_samples()
    blocker = gate.hold()
    victim = fal.submit(APP, arguments=small(num_inference_steps=8))
    assert type(fal.status(APP, victim.request_id)).__name__ == "Queued"
    fal.cancel(APP, victim.request_id)
    status = fal.status(APP, victim.request_id, with_logs=True)
    assert type(status).__name__ == "Completed" and status.error_type == "cancelled" and status.logs == []
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        fal.result(APP, victim.request_id)
    assert err.value.status_code == 400 and "cancelled" in str(err.value)
    gate.open()
    done = wait_status(http, blocker, lambda b: b["status"] == "COMPLETED")
    assert denoised_samples() - before == len(step_logs(done)) > 0  # the blocker's steps only


def test_cancelling_a_running_request_stops_it_at_the_next_step(fal, http):
    before = denoised_samples()
    handle = fal.submit(APP, arguments=slow())
    wait_status(http, handle.request_id, lambda b: len(step_logs(b)) >= 2)
    fal.cancel(APP, handle.request_id)
    done = wait_status(http, handle.request_id, lambda b: b["status"] == "COMPLETED", timeout_s=30)
    assert done["error_type"] == "cancelled"
    assert len(step_logs(done)) < 50
    assert http.get(f"{REQUESTS}/{handle.request_id}").status_code == 400
    denoiser = serve.get_deployment_handle("Denoiser", APP_NAME)
    deadline = time.monotonic() + 5
    while denoiser.stats.remote().result()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert denoiser.stats.remote().result()["active"] == 0  # it left the engine
    time.sleep(0.5)  # the forward that was running when it left may still finish
    settled = denoised_samples()
    time.sleep(0.5)
    assert denoised_samples() == settled < before + 50  # and no forward carries it any more
    # Its place in the engine is free again: the next request runs at once.
    assert fal.run(APP, arguments=small())["seed"] == 1


def test_invalid_input_is_the_clients_http_error_naming_the_field(fal):
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        fal.run(APP, arguments=small(num_inference_steps=0))
    assert err.value.status_code == 422 and "num_inference_steps" in str(err.value)
    with pytest.raises(fal_client.FalClientHTTPError) as err:  # validated at submit: nothing is queued
        fal.submit(APP, arguments=small(guidance_scale=99))
    assert err.value.status_code == 422 and "guidance_scale" in str(err.value)


def test_async_client(fal):
    async def scenario():
        client = fal_client.AsyncClient(key=KEY)
        updates = []
        result = await client.subscribe(APP, arguments=small(seed=7), with_logs=True, on_queue_update=updates.append)
        ran = await client.run(APP, arguments=small(seed=7, sync_mode=True))
        return result, ran, updates

    result, ran, updates = asyncio.run(scenario())
    assert result["seed"] == 7 and type(updates[-1]).__name__ == "Completed"
    assert ran["images"][0]["url"].startswith("data:image/jpeg;base64,")


def test_api_key_is_required_except_for_health_and_files(fal, server):
    url = fal.run(APP, arguments=small())["images"][0]["url"]
    for headers in ({}, {"Authorization": "Key wrong"}, {"Authorization": f"Bearer {KEY}"}):
        assert httpx.post(f"{server}/fal-ai/flux/srpo", json=small(), headers=headers).status_code == 401
        assert httpx.get(f"{server}{REQUESTS}/x/status", headers=headers).status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(url).status_code == 200
    logs = Path("/tmp/ray/session_latest/logs")
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked, f"the API key appears in {leaked}"


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[dict] = []
    status = 200

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers["content-length"])
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        return None


@pytest.fixture
def receiver():
    handler = type("Receiver", (_Receiver,), {"bodies": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_webhook_receives_the_body_once(fal, receiver):
    handler, url = receiver
    handle = fal.submit(APP, arguments=small(seed=11), webhook_url=url)
    result = fal.result(APP, handle.request_id)
    deadline = time.monotonic() + 10
    while not handler.bodies and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert len(handler.bodies) == 1
    body = handler.bodies[0]
    assert body == {"request_id": handle.request_id, "gateway_request_id": handle.request_id, "status": "OK",
                    "payload": result, "error": None}


def test_a_failing_webhook_receiver_never_affects_the_result(fal, receiver):
    handler, url = receiver
    handler.status = 500
    handle = fal.submit(APP, arguments=small(seed=12), webhook_url=url)
    assert fal.result(APP, handle.request_id)["seed"] == 12
    deadline = time.monotonic() + 15
    while len(handler.bodies) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(handler.bodies) == 3  # every attempt (backing off 1 s, then 2 s)...
    time.sleep(4.5)  # ...then no 4th, which would have come 4 s after the 3rd: nothing to wait for but time
    assert len(handler.bodies) == 3
    assert fal.result(APP, handle.request_id)["seed"] == 12


def test_a_failed_request_completes_with_its_error_on_the_result_route_and_webhook(fal, receiver):
    handler, url = receiver
    handle = fal.submit(I2I, arguments={"prompt": "x", "image_url": "http://10.1.2.3/photo.png"}, webhook_url=url)
    status = wait_for_completion(fal, handle.request_id)
    assert status.error and "Could not load image from url" in status.error
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        fal.result(APP, handle.request_id)
    assert err.value.status_code == 422 and "Could not load image from url" in str(err.value)
    deadline = time.monotonic() + 10
    while not handler.bodies and time.monotonic() < deadline:
        time.sleep(0.05)
    (body,) = handler.bodies
    assert body["status"] == "ERROR" and body["request_id"] == handle.request_id
    assert "Could not load image from url" in body["error"] and "Could not load" in body["payload"]["detail"]


def wait_for_completion(fal, request_id: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = fal.status(APP, request_id, with_logs=True)
        if type(status).__name__ == "Completed":
            return status
        time.sleep(0.05)
    raise AssertionError(f"{request_id} did not complete")


def test_a_queued_sync_mode_result_is_not_kept_after_it_is_read(fal, http):
    handle = fal.submit(APP, arguments=small(sync_mode=True))
    out = fal.result(APP, handle.request_id)
    assert out["images"][0]["url"].startswith("data:image/jpeg;base64,")
    assert http.get(f"{REQUESTS}/{handle.request_id}").status_code == 404


def test_a_webhook_into_a_private_network_is_refused_at_submit(http):
    response = http.post(f"/queue/{APP}", params={"fal_webhook": "http://169.254.169.254/latest"}, json=small())
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "fal_webhook"]


def test_a_full_queue_answers_429_and_enqueues_nothing(http, gate):
    gate.hold()
    queued = [http.post(f"/queue/{APP}", json=small(seed=s)).json() for s in range(MAX_PENDING)]
    assert [q["queue_position"] for q in queued] == list(range(MAX_PENDING))
    refused = http.post(f"/queue/{APP}", json=small())
    assert refused.status_code == 429 and refused.headers["retry-after"]
    assert refused.headers["content-type"] == "application/json"
    last = http.get(f"{REQUESTS}/{queued[-1]['request_id']}/status").json()
    assert last["queue_position"] == MAX_PENDING - 1  # nothing was added behind it
    gate.open()
    for q in queued:
        wait_status(http, q["request_id"], lambda b: b["status"] == "COMPLETED")


def test_urls_follow_the_scheme_and_host_the_client_used(http):
    body = http.post(f"/queue/{APP}", json=small(),
                     headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "images.example.com"}).json()
    rid = body["request_id"]
    assert body["status_url"] == f"https://images.example.com/queue/fal-ai/flux/requests/{rid}/status"
    assert body["response_url"] == f"https://images.example.com/queue/fal-ai/flux/requests/{rid}"
    assert body["cancel_url"] == f"https://images.example.com/queue/fal-ai/flux/requests/{rid}/cancel"
    wait_status(http, rid, lambda b: b["status"] == "COMPLETED")


def test_status_stream_sends_each_log_once_then_closes(http):
    rid = http.post(f"/queue/{APP}", json=small(num_inference_steps=5)).json()["request_id"]
    events = []
    with http.stream("GET", f"{REQUESTS}/{rid}/status/stream", params={"logs": 1}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "COMPLETED"
    messages = [e["message"] for event in events for e in event.get("logs") or []]
    assert [m for m in messages if m.startswith("step ")] == [f"step {i}/5" for i in range(1, 6)]


def test_the_proxy_route_refuses_other_targets(http):
    response = http.post("/api/fal/proxy", json=small(), headers={"x-fal-target-url": "https://example.com/x"})
    assert response.status_code == 400 and "x-fal-target-url" in response.json()["detail"]


@pytest.mark.parametrize("mode", ["poll", "stream", "proxy"])
def test_javascript_client_subscribe(server, mode):
    run = subprocess.run(["node", str(JS_SCRIPT), server, KEY, mode], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert UUID.match(out["requestId"])
    assert len(out["data"]["images"]) == 1 and out["data"]["seed"] == 5
    assert out["statuses"][-1] == "COMPLETED" and "IN_PROGRESS" in out["statuses"]
    assert [m for m in out["logs"] if m.startswith("step ")] == [f"step {i}/6" for i in range(1, 7)]


def test_records_survive_killing_the_ingress_replica(http):
    assert_records_survive_ingress_kill(http)


def test_start_timeout_is_a_504_the_client_does_not_retry(fal, http, gate):
    blocker = gate.hold()
    with pytest.raises(fal_client.client.FalClientHTTPError) as err:
        fal.subscribe(APP, arguments=small(seed=21), start_timeout=1.5)
    assert err.value.status_code == 504, err.value
    assert err.value.response.headers["x-fal-request-timeout-type"] == "user"
    assert err.value.response.headers["x-fal-error-type"] == "request_timeout"
    gate.open()
    wait_status(http, blocker, lambda b: b["status"] == "COMPLETED")


def test_low_priority_requests_are_overtaken_by_normal_ones(fal, http, gate):
    gate.hold()
    low = [fal.submit(APP, arguments=small(seed=30 + i), priority="low") for i in range(2)]
    normal = fal.submit(APP, arguments=small(seed=40), priority="normal", hint="gpu-pool-a")  # a hint never blocks
    positions = {h.request_id: http.get(f"{REQUESTS}/{h.request_id}/status").json()["queue_position"]
                 for h in (*low, normal)}
    assert [positions[h.request_id] for h in (normal, *low)] == [0, 1, 2], positions
    gate.open()

    def started(handle) -> float:
        body = wait_status(http, handle.request_id, lambda b: b["status"] == "COMPLETED")
        return min(e["timestamp"] for e in body["logs"])  # ISO-8601 UTC: orders as text

    order = sorted((normal, *low), key=lambda h: started(h))
    assert [h.request_id for h in order] == [normal.request_id, low[0].request_id, low[1].request_id]


def test_fal_max_queue_length_refuses_a_submit_behind_that_many(http, gate):
    gate.hold()
    waiting = http.post(f"/queue/{APP}", json=small(seed=50), params={"fal_max_queue_length": 1}).json()
    assert waiting["queue_position"] == 0
    refused = http.post(f"/queue/{APP}", json=small(seed=51), params={"fal_max_queue_length": 1})
    assert refused.status_code == 429 and refused.json()["error_type"] == "too_many_requests", refused.text
    assert refused.headers["x-fal-error-type"] == "too_many_requests"
    bad = http.post(f"/queue/{APP}", json=small(), params={"fal_max_queue_length": -1})
    assert bad.status_code == 422 and bad.headers["x-fal-error-type"] == "input_error"
    assert bad.json()["error_type"] == "input_error" and bad.json()["detail"][0]["loc"][-1] == "fal_max_queue_length"
    gate.open()
    wait_status(http, waiting["request_id"], lambda b: b["status"] == "COMPLETED")


def test_every_failure_names_its_error_type(http, server):
    unknown = http.get(f"{REQUESTS}/no-such-request/status")
    assert unknown.status_code == 404 and unknown.json()["error_type"] == unknown.headers["x-fal-error-type"]
    no_key = httpx.post(f"{server}/{APP}", json=small())
    assert no_key.status_code == 401 and no_key.headers["x-fal-error-type"] == "unauthorized"
    invalid = http.post(f"/{APP}", json=small(num_inference_steps=0))
    assert invalid.headers["x-fal-error-type"] == "input_error" and invalid.json()["detail"][0]["loc"]
