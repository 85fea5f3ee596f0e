"""Scale to zero (opt-in: the Denoiser's `min_replicas: 0`): after idling the Denoiser has no replica;
a synchronous and a queued request arriving then wait while the work-aware autoscaler starts one,
and both succeed. Each one's wait is its cold start: in its logs and in `srpo_cold_start_seconds`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from ray import serve

from tests.harness import APP_NAME, free_port, running_serve, tiny_env, wait_until
from tests.queue_helpers import APP, REQUESTS, small, wait_status
from tests.test_metrics import scrape_until

TO_ZERO = {
    "min_replicas": 0, "initial_replicas": 1, "max_replicas": 1,
    "upscale_delay_s": 0.5, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2,
    "look_back_period_s": 1, "metrics_interval_s": 0.5,
    "policy": {"policy_function": "deployments.autoscaling:DenoiserWorkPolicy", "policy_kwargs": {"target_backlog_s": 4}},
}


def running_denoisers() -> int:
    return serve.status().applications[APP_NAME].deployments["Denoiser"].replica_states.get("RUNNING", 0)


def test_a_request_waits_for_a_replica_when_the_denoiser_scaled_to_zero(tiny_root, tmp_path):
    metrics_port = free_port()
    args = {"deployment_options": {"Denoiser": {"autoscaling_config": TO_ZERO}}}
    with running_serve(tiny_env(tiny_root, tmp_path), args, metrics_port=metrics_port) as base, \
            httpx.Client(base_url=base, timeout=180) as client, ThreadPoolExecutor(1) as pool:
        # A first call through the ingress's Denoiser handle, then idle until no replica is left.
        assert client.post(f"/{APP}", json=small()).status_code == 200
        wait_until(lambda: running_denoisers() == 0, 90, "the Denoiser to scale to zero")
        # The queued request first: the queue worker claims one request while no Denoiser runs.
        queued = client.post(f"/queue/{APP}", json=small(seed=3)).json()["request_id"]
        wait_status(client, queued, lambda b: b["status"] != "IN_QUEUE")
        sync = pool.submit(client.post, f"/{APP}", json=small(seed=2))
        response = sync.result()
        assert response.status_code == 200, response.text
        status = wait_status(client, queued, lambda b: b["status"] == "COMPLETED", timeout_s=120)
        assert "error" not in status, status
        assert client.get(f"{REQUESTS}/{queued}").status_code == 200
        cold = [e["message"] for e in status["logs"] if e["message"].startswith("Cold start: waited")]
        assert len(cold) == 1, status["logs"]
        scrape = scrape_until(f"http://127.0.0.1:{metrics_port}/metrics",
                              lambda s: s.value("ray_srpo_cold_start_seconds_count") >= 1, "a cold start")
        print(cold[0], "; cold starts observed:", scrape.value("ray_srpo_cold_start_seconds_count"),
              "mean", scrape.value("ray_srpo_cold_start_seconds_sum")
              / scrape.value("ray_srpo_cold_start_seconds_count"))
