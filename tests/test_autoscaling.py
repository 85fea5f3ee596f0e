"""The Denoiser scales from 1 to 2 replicas under sustained load and back to 1 after it (CPU, tiny model)."""

from __future__ import annotations

import threading
import time

import httpx
from ray import serve

from tests.harness import APP_NAME, running_serve, tiny_env

FAST_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 3,
    "look_back_period_s": 2,
}


def _running_denoisers() -> int:
    status = serve.status().applications[APP_NAME].deployments["Denoiser"]
    return status.replica_states.get("RUNNING", 0)


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_denoiser_scales_up_under_load_and_back_down(tiny_root, tmp_path):
    args = {"deployment_options": {"Denoiser": {"autoscaling_config": FAST_AUTOSCALING}}}
    with running_serve(tiny_env(tiny_root, tmp_path), args) as base:
        assert _running_denoisers() == 1
        stop = threading.Event()
        failures: list[str] = []

        def client_loop() -> None:
            body = {"prompt": "load", "image_size": {"width": 512, "height": 512}, "num_inference_steps": 30,
                    "sync_mode": True, "enable_safety_checker": False}
            with httpx.Client(timeout=120) as client:
                while not stop.is_set():
                    response = client.post(f"{base}/fal-ai/flux/srpo", json=body)
                    if response.status_code != 200:
                        failures.append(response.text)

        threads = [threading.Thread(target=client_loop) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            scaled_up = _wait_for(lambda: _running_denoisers() >= 2, timeout_s=90)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        assert scaled_up, "Denoiser never reached 2 replicas under load"
        assert not failures
        assert _wait_for(lambda: _running_denoisers() == 1, timeout_s=90), "Denoiser did not scale back to 1"
