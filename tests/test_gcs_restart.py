"""Head / GCS loss with GCS fault tolerance on an external Redis, as k8s/base configures it (KubeRay's
`gcsFaultToleranceOptions` gives the head `RAY_REDIS_ADDRESS` and `RAY_external_storage_namespace`).

On the 3-node cluster of tests/cluster.py, serving (each request path used once), the GCS process is
killed: Serve keeps answering through the outage (6 synchronous requests from 2 clients answer 200,
8 queued ones are accepted, the proxy's health check stays 200). The GCS is then restarted against
the same Redis: the controller takes a deployment update again, its autoscaler adds the second
Denoiser that queued work asks for, and every request accepted during the outage (and after)
completes. Docs: docs/operations.md.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import pytest
from ray import serve
from ray._private.gcs_utils import cleanup_redis_storage

from deployments.app import build_app
from tests.cluster import LocalCluster, cluster_options, deploy, local_cluster, replica_nodes
from tests.harness import APP_NAME, tiny_env, wait_until
from tests.queue_helpers import REQUESTS, wait_status
from tests.test_scale_to_zero import running_denoisers
from tests.test_cluster import T2I, body

# One Denoiser through the outage; the update sent after it lets the autoscaler (deployments/autoscaling.py)
# add a second for the work queued meanwhile: with this tiny target any work asks for two.
ONE = {"min_replicas": 1, "max_replicas": 1}
UP_TO_TWO = {
    "min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0.5, "look_back_period_s": 1, "metrics_interval_s": 0.5,
    "policy": {"policy_function": "deployments.autoscaling:DenoiserWorkPolicy",
               "policy_kwargs": {"target_backlog_s": 0.001}},
}


def app_args(autoscaling: dict) -> dict:
    return {"deployment_options": cluster_options(1, {"num_replicas": "auto", "autoscaling_config": autoscaling})}


@pytest.fixture
def gcs_in_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What KubeRay sets on the head for `gcsFaultToleranceOptions`: the Redis and a namespace of
    this cluster's own in it (KubeRay's default: the RayCluster's UID). The namespace is deleted
    afterwards, as KubeRay's clean-up job does when a RayCluster goes."""
    host, port = redis_url.removeprefix("redis://").removesuffix("/0").split(":")
    namespace = f"srpo-test-{uuid.uuid4()}"
    monkeypatch.setenv("RAY_REDIS_ADDRESS", f"{host}:{port}")
    monkeypatch.setenv("RAY_external_storage_namespace", namespace)
    yield
    assert cleanup_redis_storage(host, int(port), "", False, namespace)


@pytest.fixture
def cluster(tiny_root, tmp_path, gcs_in_redis) -> Iterator[LocalCluster]:
    env = tiny_env(tiny_root, tmp_path, SRPO_QUEUE_CONCURRENCY="8")
    with local_cluster(env) as local:
        yield local


def sync_requests(client: httpx.Client, first: int, count: int) -> list[httpx.Response]:
    """`count` synchronous requests one after the other: one client's steady stream."""
    return [client.post(f"/{T2I}", json=body(first + i, steps=4)) for i in range(count)]


def test_serve_answers_through_a_gcs_outage_and_resumes_after(cluster):
    deploy(cluster, app_args(ONE))
    head = cluster.cluster.head_node
    with httpx.Client(base_url=cluster.base, timeout=50) as client, ThreadPoolExecutor(2) as pool:
        # Serving as before the fault: each path has run once (a handle finds its replicas through
        # the GCS the first time it is used).
        assert client.post(f"/{T2I}", json=body(0, steps=2)).status_code == 200
        warm = client.post(f"/queue/{T2I}", json=body(1, steps=2)).json()["request_id"]
        wait_status(client, warm, lambda b: b["status"] == "COMPLETED", timeout_s=60)
        head.kill_gcs_server()
        killed = time.monotonic()
        # The outage: the synchronous requests answer, the queued ones are accepted. Bounded: Ray's
        # processes (this driver too) give up on a GCS away for `gcs_rpc_server_reconnect_timeout_s`, 60 s.
        sync = [pool.submit(sync_requests, client, 50 + 3 * i, 3) for i in range(2)]
        queued = []
        for fields in [body(40 + i) for i in range(8)]:
            response = client.post(f"/queue/{T2I}", json=fields)
            assert response.status_code == 200, response.text
            queued.append(response.json()["request_id"])
        answers = [r for future in sync for r in future.result()]
        assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
        assert client.get("/-/healthz").status_code == 200  # KubeRay's probe keeps the head in the Service
        outage_s = time.monotonic() - killed
        head.start_gcs_server()
        restarted = time.monotonic()
        # The controller takes an update again, and the autoscaler acts on queued work. The one Denoiser
        # runs the outage's requests meanwhile and may have finished them by now: more are queued so
        # that work waits whenever the autoscaler looks.
        serve.run(build_app(app_args(UP_TO_TWO)), name=APP_NAME, route_prefix="/", blocking=False)
        for fields in [body(60 + i) for i in range(8)]:
            response = client.post(f"/queue/{T2I}", json=fields)
            assert response.status_code == 200, response.text
            queued.append(response.json()["request_id"])
        wait_until(lambda: running_denoisers() == 2, 180, "a second Denoiser replica after the GCS restart")
        scaled_s = time.monotonic() - restarted
        for request_id in queued:
            status = wait_status(client, request_id, lambda b: b["status"] == "COMPLETED", timeout_s=180)
            assert "error" not in status, status
            assert client.get(f"{REQUESTS}/{request_id}").status_code == 200
        done_s = time.monotonic() - restarted
    assert len(set(replica_nodes("Denoiser"))) == 2
    print(f"outage {outage_s:.1f} s; after the GCS restart: 2 Denoisers in {scaled_s:.1f} s, "
          f"every queued request done in {done_s:.1f} s")
    serve.shutdown()
