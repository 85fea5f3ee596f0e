"""The Denoiser scales on estimated work (deployments/autoscaling.py), CPU, tiny model: from 1 to 2
replicas under sustained sync load and back, and again for a backlog that waits in the request store."""

from __future__ import annotations

import threading

import httpx
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import DenoiserWorkPolicy, work_estimate
from tests.harness import APP_NAME, running_serve, tiny_env, wait_until
from tests.queue_helpers import APP, REQUESTS

FAST_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 3,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
    "policy": {"policy_function": "deployments.autoscaling:DenoiserWorkPolicy",
               "policy_kwargs": {"target_backlog_s": 0.5}},
}
# Estimated work on the CPU profile: ~0.2 s (512x512, 30 steps); a backlog of 12 is ~15 s (1024x1024).
LOAD = {"prompt": "load", "image_size": {"width": 512, "height": 512}, "num_inference_steps": 30,
        "enable_safety_checker": False}
BACKLOG = LOAD | {"image_size": {"width": 1024, "height": 1024}}


def _running_denoisers() -> int:
    status = serve.status().applications[APP_NAME].deployments["Denoiser"]
    return status.replica_states.get("RUNNING", 0)


def _context(metrics: dict[str, dict[str, float]], queued: float, replicas: int = 1) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=None, deployment_name="Denoiser", app_name=APP_NAME, current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=[], total_num_requests=queued, total_queued_requests=queued,
        aggregated_metrics=metrics, raw_metrics=None, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=None, config=AutoscalingConfig(**FAST_AUTOSCALING))


def test_the_policy_counts_seconds_of_work_not_requests():
    policy = DenoiserWorkPolicy(target_backlog_s=10.0)
    # Two replicas each holding 6 s, 3 requests queued in routers and 5 in the store at 2 s each.
    busy = {"backlog_s": {"a": 6.0, "b": 6.0}, "request_s": {"a": 2.0, "b": 2.0}, "store_waiting": {"a": 5.0, "b": 5.0}}
    assert work_estimate(_context(busy, queued=3)).total_s == 12.0 + 8 * 2.0
    assert policy(_context(busy, queued=3, replicas=2))[0] == 2.8
    # The same count of requests, each 10x the work: 10x the replicas.
    heavy = busy | {"request_s": {"a": 20.0, "b": 20.0}, "backlog_s": {"a": 60.0, "b": 60.0}}
    assert policy(_context(heavy, queued=3, replicas=2))[0] == 28.0
    assert policy(_context({}, queued=0))[0] == 0.0  # idle: Serve's bounds keep min_replicas


def test_a_request_waiting_with_no_replica_running_asks_for_one():
    """Scaled to zero no replica reports the work of a request: one waiting still needs a replica."""
    policy = DenoiserWorkPolicy(target_backlog_s=10.0)
    assert policy(_context({}, queued=1, replicas=0))[0] == 1.0
    assert policy(_context({}, queued=0, replicas=0))[0] == 0.0


def test_denoiser_scales_on_sync_load_and_on_a_backlog_in_the_request_store(tiny_root, tmp_path):
    args = {"deployment_options": {"Denoiser": {"autoscaling_config": FAST_AUTOSCALING}}}
    with running_serve(tiny_env(tiny_root, tmp_path), args) as base:
        assert _running_denoisers() == 1
        # Sync requests: they wait in Serve's router in front of the Denoiser.
        stop = threading.Event()
        failures: list[str] = []

        def client_loop() -> None:
            with httpx.Client(timeout=120) as client:
                while not stop.is_set():
                    response = client.post(f"{base}/fal-ai/flux/srpo", json=LOAD | {"sync_mode": True})
                    if response.status_code != 200:
                        failures.append(response.text)

        threads = [threading.Thread(target=client_loop) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: _running_denoisers() >= 2, 90, "a second Denoiser under sync load")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        assert not failures
        wait_until(lambda: _running_denoisers() == 1, 90, "the Denoisers to scale back to 1")

        # Queued requests: the ingress claims only what a Denoiser can start soon, so the rest waits
        # in the request store, where the Denoisers' autoscaling metrics count it.
        with httpx.Client(base_url=base, timeout=60) as client:
            ids = [client.post(f"/queue/{APP}", json=BACKLOG | {"seed": i}).json()["request_id"] for i in range(12)]

            def statuses() -> list[str]:
                return [client.get(f"{REQUESTS}/{i}/status").json()["status"] for i in ids]

            assert statuses().count("IN_QUEUE") >= 8, "the backlog should wait in the store"
            wait_until(lambda: _running_denoisers() >= 2, 90, "a second Denoiser for the store's backlog")
            wait_until(lambda: statuses() == ["COMPLETED"] * 12, 180, "the backlog to complete")
            for request_id in ids:
                result = client.get(f"{REQUESTS}/{request_id}")
                assert result.status_code == 200 and len(result.json()["images"]) == 1, result.text
