"""Deadlines and the synchronous concurrency limit on the real Serve graph (tiny model).

A request past `SRPO_REQUEST_TIMEOUT_S` is a 504 and its denoising stops (the Denoiser's engine lets
it go), and a synchronous call beyond `SRPO_SYNC_MAX_CONCURRENCY` is a 429 whose slot accounting
survives the 504 and 422 paths.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import pytest
from ray import serve

from tests.gate import gate_server
from tests.harness import APP_NAME, running_serve, tiny_env, wait_until
from tests.queue_helpers import denoised_samples

T2I, I2I = "/fal-ai/flux/srpo", "/fal-ai/flux/srpo/image-to-image"
TIMEOUT_S = 4
SMALL = {"prompt": "quick", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def server(tiny_root, tmp_path_factory) -> Iterator[str]:
    env = tiny_env(tiny_root, tmp_path_factory.mktemp("deadlines"), SRPO_REQUEST_TIMEOUT_S=str(TIMEOUT_S),
                   SRPO_SYNC_MAX_CONCURRENCY="1", SRPO_IMAGE_URL_ALLOWED_NETWORKS='["127.0.0.1/32"]')
    with running_serve(env, {"text_batch_wait_s": 0.0, "decode_batch_wait_s": 0.0}) as base:
        yield base


def _active() -> int:
    return serve.get_deployment_handle("Denoiser", APP_NAME).stats.remote().result()["active"]


def test_a_request_past_its_deadline_is_504_and_its_denoising_stops(server):
    steps = 50  # at the largest size: far more than the deadline allows on any CPU
    body = {"prompt": "too long", "image_size": {"width": 1536, "height": 1536}, "num_inference_steps": steps,
            "seed": 1}
    before = denoised_samples()
    response = httpx.post(server + T2I, json=body, timeout=120)
    assert response.status_code == 504, response.text[:300]
    assert response.json()["error_type"] == "request_timeout" and "SRPO_REQUEST_TIMEOUT_S" in response.json()["detail"]
    assert denoised_samples() > before  # it was denoising when the deadline came
    wait_until(lambda: _active() == 0, 5, "the Denoiser to let the request go")
    assert denoised_samples() - before < steps  # it left before the end, not after running to completion
    assert httpx.post(server + T2I, json=SMALL, timeout=60).status_code == 200


def test_sync_overload_is_429_and_the_504_and_422_paths_free_their_slot(server):
    with gate_server() as gate, httpx.Client(base_url=server, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.post, I2I, json=gate.held_body())
        wait_until(lambda: gate.hits, 30, "the held request to take the slot")
        refused = client.post(T2I, json=SMALL)
        assert refused.status_code == 429 and refused.headers["retry-after"], refused.text
        assert refused.json()["error_type"] == "too_many_requests" and "SRPO_SYNC_MAX_CONCURRENCY" in refused.text
        assert held.result().status_code == 504  # the gate stays shut: the deadline ends it
        unreadable = client.post(I2I, json={"prompt": "x", "image_url": "data:image/png;base64,AAAA"})
        assert unreadable.status_code == 422, unreadable.text
        assert client.post(T2I, json=SMALL).status_code == 200  # neither path kept the slot

        held = pool.submit(client.post, I2I, json=gate.held_body())  # and the count is exact: one slot again
        wait_until(lambda: len(gate.hits) == 2, 30, "the second held request to take the slot")
        assert client.post(T2I, json=SMALL).status_code == 429
        gate.open()
        assert held.result().status_code == 200
