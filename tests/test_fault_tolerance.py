"""Nothing accepted is lost: replicas SIGKILLed mid-request, a failing health check, a restarted Redis.

A real Serve instance on the tiny model; every request of a disturbed run must give the pixels of
an undisturbed one (the in-process reference pipeline).
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import httpx
import numpy as np
import pytest
import ray
import torch
from ray import serve

from api.schemas import TextToImageInput
from models.pipeline import SRPOPipeline
from server.service import to_generation_request
from tests.conftest import CPU
from tests.harness import APP_NAME, running_serve, tiny_env, wait_until
from tests.pixels import assert_same_pixels, pixels
from tests.queue_helpers import REQUESTS, step_logs, wait_status

T2I = "fal-ai/flux/srpo"
STAGES = ("Denoiser", "TextEncoder", "Decoder")
MAX_ATTEMPTS = 2  # every test kills once; one test kills twice to use them up
FAST_HEALTH = {"health_check_period_s": 1, "health_check_timeout_s": 10}
# The TextEncoder's and Decoder's calls wait this long inside the replica for a batch (sizes above any
# test's load), so a kill made once a request has reached the stage lands while its call is in flight.
STAGE_BATCH = {"text_batch_size": 64, "text_batch_wait_s": 1.5, "decode_batch_size": 64, "decode_batch_wait_s": 1.5}


def body(stage: str, i: int, steps: int | None = None) -> dict[str, Any]:
    # A prompt of its own per request: the TextEncoder's cache must not answer for a killed replica.
    # Denoiser chaos: long enough to be caught denoising (a replica holds only what it can start soon).
    (width, height), steps = ((1024, 768), steps or 50) if stage == "Denoiser" else ((256, 256), steps or 12)
    return {"prompt": f"{stage} chaos {i}", "seed": 100 + i, "image_size": {"width": width, "height": height},
            "num_inference_steps": steps, "output_format": "png", "enable_safety_checker": False}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_safety_dir) -> SRPOPipeline:
    return SRPOPipeline(tiny_model_dir, tiny_safety_dir, CPU, torch.float32)


def expected(reference: SRPOPipeline, fields: dict[str, Any]) -> np.ndarray:
    request = to_generation_request(TextToImageInput(**fields), fields["seed"])
    return reference.generate(request, enable_safety_checker=False).images[0]


@pytest.fixture(scope="module")
def server(tiny_root, tmp_path_factory) -> Iterator[str]:
    env = tiny_env(tiny_root, tmp_path_factory.mktemp("chaos"), SRPO_FAULT_INJECTION="true",
                   SRPO_QUEUE_CONCURRENCY="8", SRPO_RETRY_MAX_ATTEMPTS=str(MAX_ATTEMPTS))
    options = {name: FAST_HEALTH for name in STAGES}
    with running_serve(env, {"deployment_options": options} | STAGE_BATCH) as base:
        yield base


def replica_names(stage: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{stage}#" in a["name"])


def sigkill(stage: str, replaced: Sequence[str] = ()) -> str:
    """SIGKILL the process of the stage's only replica once a call is in it; Serve's controller starts a
    new one. The replica decides and kills itself: a kill decided outside could land after the call ended.
    `replaced`: replicas killed before (listed for a moment after their death)."""
    victim: list[str] = []

    def killed() -> bool:
        victim[:] = [name for name in replica_names(stage) if name not in replaced]
        if len(victim) != 1:
            return False
        try:
            return ray.get(ray.get_actor(victim[0], namespace="serve").__ray_call__.remote(_kill_if_busy), timeout=10)
        except ValueError:  # not (or no longer) registered
            return False
        except ray.exceptions.RayActorError:
            return True  # it died answering: the kill

    wait_until(killed, 60, f"a call in the {stage} replica to kill it with")
    return victim[0]


def _kill_if_busy(replica) -> bool:
    """Runs inside the replica's process: SIGKILL it if Serve counts a request in it (its own count,
    read beside the user code); False if none is."""
    if replica.get_num_ongoing_requests() > 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return False


def logs_of(client: httpx.Client, request_id: str) -> list[str]:
    response = client.get(f"{REQUESTS}/{request_id}/status", params={"logs": 1})
    return [e["message"] for e in response.json().get("logs") or []] if response.status_code in (200, 202) else []


def run_disturbed(server: str, stage: str, disturb, sync_first: bool = True) -> tuple[list[dict], list[list[str]]]:
    """6 queued and 6 synchronous requests; `disturb(client, queued_ids)` acts while they run. With
    `sync_first` false the synchronous ones are sent after it, so they meet the replacement."""
    with httpx.Client(base_url=server, timeout=180) as client, ThreadPoolExecutor(6) as pool:
        queued = [client.post(f"/queue/{T2I}", json=body(stage, i)).json()["request_id"] for i in range(6)]

        def send_sync() -> list:
            return [pool.submit(client.post, f"/{T2I}", json=body(stage, i)) for i in range(6, 12)]

        sync = send_sync() if sync_first else []
        disturb(client, queued)
        sync = sync or send_sync()
        sync_bodies = []
        for future in sync:
            response = future.result()
            assert response.status_code == 200, response.text
            sync_bodies.append(response.json())
        queued_bodies, queued_logs = [], []
        for request_id in queued:
            status = wait_status(client, request_id, lambda b: b["status"] == "COMPLETED", timeout_s=180)
            assert "error" not in status, (status.get("error_type"), status.get("error"), logs_of(client, request_id))
            queued_bodies.append(client.get(f"{REQUESTS}/{request_id}").json())
            queued_logs.append(logs_of(client, request_id))
        return queued_bodies + sync_bodies, queued_logs


def assert_undisturbed_pixels(server: str, reference: SRPOPipeline, stage: str, outputs: list[dict]) -> None:
    with httpx.Client(base_url=server, timeout=30) as client:
        for i, output in enumerate(outputs):
            assert_same_pixels(pixels(output["images"][0]["url"], client), expected(reference, body(stage, i)))


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_of_a_stage_replica_loses_no_request(server, reference, stage):
    killed: list[str] = []

    def kill(client: httpx.Client, queued: list[str]) -> None:
        if stage == "Denoiser":
            sign = "step "
        else:  # while its call waits in the replica for a batch (STAGE_BATCH)
            sign = "Encoding the prompt" if stage == "TextEncoder" else "Decoding"
        wait_until(lambda: any(m.startswith(sign) for q in queued for m in logs_of(client, q)), 60,
                   f"a call to the {stage}")
        killed.append(sigkill(stage))

    # The Denoiser's synchronous requests come after the kill: every call it kills is then a queued
    # request's, whose logs show the retry.
    outputs, queued_logs = run_disturbed(server, stage, kill, sync_first=stage != "Denoiser")
    assert_undisturbed_pixels(server, reference, stage, outputs)
    wait_until(lambda: replica_names(stage) and replica_names(stage) != killed, 60, f"a new {stage} replica")
    # The requests whose call was in flight on it ran again.
    assert any(any(m.startswith("Retrying: a model replica stopped") for m in logs) for logs in queued_logs)


def test_a_request_whose_every_attempt_loses_its_replica_fails_503(server):
    """SRPO_RETRY_MAX_ATTEMPTS runs, each with its TextEncoder call in flight on a replica that is then
    killed: the request ends 503 runner_disconnected instead of running a third time."""
    killed: list[str] = []
    with httpx.Client(base_url=server, timeout=120) as client:
        request_id = client.post(f"/queue/{T2I}", json=body("exhausted", 0)).json()["request_id"]
        for attempt in range(1, MAX_ATTEMPTS + 1):
            wait_until(lambda: logs_of(client, request_id).count("Encoding the prompt") == attempt, 120,
                       f"attempt {attempt} to reach the TextEncoder")
            # The retried call waits in the new replica for its batch (STAGE_BATCH): killed once it is there.
            killed.append(sigkill("TextEncoder", killed))
        status = wait_status(client, request_id, lambda b: b["status"] == "COMPLETED", timeout_s=120)
        assert status.get("error_type") == "runner_disconnected", (status, logs_of(client, request_id))
        assert f"after {MAX_ATTEMPTS} attempts" in status["error"]
        assert client.get(f"{REQUESTS}/{request_id}").status_code == 503
        assert logs_of(client, request_id).count("Encoding the prompt") == MAX_ATTEMPTS


def test_no_retry_header_fails_instead_of_running_again(server):
    """With x-fal-no-retry a request that was denoising on a killed replica fails; one that was still
    waiting in front of the Denoiser (it holds one 1024x1024 request: no room, no batching) was
    never started, so it runs once on the new replica."""
    with httpx.Client(base_url=server, timeout=120) as client, ThreadPoolExecutor(1) as pool:
        long = body("no-retry", 0, steps=50) | {"image_size": {"width": 1024, "height": 1024}}
        running = client.post(f"/queue/{T2I}", json=long, headers={"x-fal-no-retry": "1"}).json()["request_id"]
        wait_status(client, running, lambda b: len(step_logs(b)) >= 1)
        waiting = pool.submit(client.post, f"/{T2I}", json=long | {"seed": 7, "num_inference_steps": 2},
                              headers={"x-fal-no-retry": "1"})
        sigkill("Denoiser")
        status = wait_status(client, running, lambda b: b["status"] == "COMPLETED", timeout_s=120)
        assert status["error_type"] == "runner_disconnected", status
        assert not any(m.startswith("Retrying") for m in logs_of(client, running))
        assert waiting.result().status_code == 200, waiting.result().text


def test_health_stays_ready_under_load_and_a_failing_check_replaces_the_replica(server, reference):
    stage = "health"
    with httpx.Client(base_url=server, timeout=180) as client:
        queued = [client.post(f"/queue/{T2I}", json=body(stage, i, steps=30)).json()["request_id"]
                  for i in range(8)]
        wait_status(client, queued[0], lambda b: len(step_logs(b)) >= 1)
        for _ in range(3):  # saturated Denoiser: readiness comes from Serve, not from a queued call
            assert client.get("/health").status_code == 200
            assert client.get("/livez").json() == {"status": "alive"}
            # Answered while the load still runs: never queued behind it (whatever the machine's speed).
            assert wait_status(client, queued[-1], lambda b: True)["status"] != "COMPLETED"
        (before,) = replica_names("Denoiser")
        serve.get_deployment_handle("Denoiser", APP_NAME).inject_fault.remote("chaos test").result()
        outputs = []
        for request_id in queued:
            status = wait_status(client, request_id, lambda b: b["status"] == "COMPLETED", timeout_s=180)
            assert "error" not in status, (status.get("error_type"), status.get("error"), logs_of(client, request_id))
            outputs.append(client.get(f"{REQUESTS}/{request_id}").json())
        wait_until(lambda: replica_names("Denoiser") not in ([], [before]), 120, "the unhealthy replica's replacement")
        for i, output in enumerate(outputs):
            assert_same_pixels(pixels(output["images"][0]["url"], client),
                               expected(reference, body(stage, i, steps=30)))
        wait_until(lambda: client.get("/health").status_code == 200, 120, "readiness after the replacement")
