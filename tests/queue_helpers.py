"""Shared steps of the queue tests that run against a live Serve instance."""

from __future__ import annotations

import time
from typing import Any

import httpx
import ray
from ray import serve

from tests.harness import APP_NAME

APP = "fal-ai/flux/srpo"
REQUESTS = "/queue/fal-ai/flux/requests"


def small(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a red fox", "image_size": {"width": 256, "height": 256}, "num_inference_steps": 4,
            "seed": 1} | fields


def slow(steps: int = 50, side: int = 1024) -> dict[str, Any]:
    """A request that keeps the (single) queue slot busy for a while on the tiny model."""
    return small(image_size={"width": side, "height": side}, num_inference_steps=steps)


def wait_status(client: httpx.Client, request_id: str, predicate, timeout_s: float = 60) -> dict:
    deadline, body = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        # While a killed replica is replaced, a poll in flight to it is dropped or answered by
        # Serve's proxy with its own error; clients retry those (fal's do on connection errors).
        try:
            response = client.get(f"{REQUESTS}/{request_id}/status", params={"logs": 1})
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        if response.status_code in (200, 202):
            body = response.json()
            if predicate(body):
                return body
        time.sleep(0.05)
    raise AssertionError(f"status of {request_id} never matched; last: {body}")


def step_logs(body: dict) -> list[str]:
    return [e["message"] for e in body.get("logs") or [] if e["message"].startswith("step ")]


def denoised_samples() -> int:
    """Sample-steps the Denoiser has run so far (one replica)."""
    sizes = serve.get_deployment_handle("Denoiser", APP_NAME).stats.remote().result()["batch_sizes"]
    return sum(size * count for size, count in sizes.items())


def kill_ingress_replica() -> str:
    """Kill the running Ingress replica's actor; Serve's controller starts a new one."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Ingress#" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def assert_records_survive_ingress_kill(client: httpx.Client) -> None:
    """A running and a queued request, both accepted by a replica that is then killed, complete."""
    running = client.post(f"/queue/{APP}", json=slow()).json()["request_id"]
    queued = client.post(f"/queue/{APP}", json=small(seed=9)).json()["request_id"]
    wait_status(client, running, lambda b: len(step_logs(b)) >= 1)
    killed = kill_ingress_replica()
    for request_id in (running, queued):
        done = wait_status(client, request_id, lambda b: b["status"] == "COMPLETED", timeout_s=120)
        assert "error" not in done, done
        result = client.get(f"{REQUESTS}/{request_id}")
        assert result.status_code == 200, result.text
        assert len(result.json()["images"]) == 1
    messages = [e["message"] for e in done["logs"]]
    assert messages, f"{queued} has no logs after {killed} was killed"
    restarted = wait_status(client, running, lambda b: True)
    assert any("Restarted" in e["message"] for e in restarted["logs"]), restarted["logs"]
