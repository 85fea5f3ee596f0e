"""The app on a 3-node cluster on one machine (tests/cluster.py): the head with the controller, the
ingress, the TextEncoder and the Decoder; two "GPU" nodes with one Denoiser each.

The layout serves through every node's proxy; a GPU node lost mid-load (queued, sync and split
multi-image requests in flight) loses nothing: with the proxies on the head only, no connection
dies with the node, every request completes with an undisturbed run's pixels, and the lost
node's requests run again on the other. Docs: docs/operations.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import pytest
import torch
import yaml
from ray import serve

from api.schemas import TextToImageInput
from models.pipeline import SRPOPipeline
from server.service import to_generation_request
from tests.cluster import LocalCluster, cluster_options, deploy, local_cluster, proxy_nodes, replica_nodes
from tests.conftest import CPU
from tests.harness import tiny_env, wait_until
from tests.pixels import assert_same_pixels, pixels
from tests.queue_helpers import REQUESTS, wait_status
from tests.test_fault_tolerance import logs_of

T2I = "fal-ai/flux/srpo"


def body(i: int, images: int = 1, steps: int = 20) -> dict[str, Any]:
    # Long enough on the tiny model to be caught denoising; a prompt of its own per request.
    return {"prompt": f"cluster {i}", "seed": 300 + i, "num_images": images, "num_inference_steps": steps,
            "image_size": {"width": 1024, "height": 768}, "output_format": "png", "enable_safety_checker": False}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_safety_dir) -> SRPOPipeline:
    return SRPOPipeline(tiny_model_dir, tiny_safety_dir, CPU, torch.float32)


def assert_reference_pixels(client: httpx.Client, reference: SRPOPipeline, fields: dict, output: dict) -> None:
    request = to_generation_request(TextToImageInput(**fields), fields["seed"])
    expected = reference.generate(request, enable_safety_checker=False).images
    assert len(output["images"]) == len(expected)
    for image, want in zip(output["images"], expected):
        assert_same_pixels(pixels(image["url"], client), want)


@pytest.fixture(scope="module")
def cluster(tiny_root, tmp_path_factory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    env = tiny_env(tiny_root, tmp, SRPO_QUEUE_CONCURRENCY="8")
    with local_cluster(env) as local:
        yield local


def test_layout_serves_through_every_nodes_proxy(cluster, reference):
    deploy(cluster, {"deployment_options": cluster_options(2)}, proxy_location="EveryNode")
    try:
        gpu = sorted(node.node_id for node in cluster.gpu_nodes)
        head = cluster.cluster.head_node.node_id
        assert replica_nodes("Denoiser") == gpu
        for stage in ("Ingress", "TextEncoder", "Decoder"):
            assert replica_nodes(stage) == [head]
        wait_until(lambda: proxy_nodes() == sorted([head, *gpu]), 60, "a proxy on every node")
        for i, (node, port) in enumerate(cluster.proxy_ports.items()):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                wait_until(lambda: _healthy(client), 60, f"the proxy of node {node[:8]}")
                fields = body(i, steps=4)
                response = client.post(f"/{T2I}", json=fields)
                assert response.status_code == 200, response.text
                assert_reference_pixels(client, reference, fields, response.json())
    finally:
        serve.shutdown()


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def test_a_lost_gpu_node_loses_no_request(cluster, reference):
    """6 queued requests (two of 2 images, split over both nodes) and 4 synchronous ones; the first
    GPU node disappears while they denoise. Proxies where serve_config.yaml puts them (the head)."""
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text())
    deploy(cluster, {"deployment_options": cluster_options(2)}, proxy_location=shipped["proxy_location"])
    assert proxy_nodes() == [cluster.cluster.head_node.node_id]
    queued_fields = [body(i, images=2 if i < 2 else 1) for i in range(6)]
    sync_fields = [body(i) for i in range(6, 10)]
    with httpx.Client(base_url=cluster.base, timeout=300) as client, ThreadPoolExecutor(4) as pool:
        # One request first: the ingress splits only once its router has heard from both replicas.
        assert client.post(f"/{T2I}", json=body(99, steps=2)).status_code == 200
        queued = [client.post(f"/queue/{T2I}", json=f).json()["request_id"] for f in queued_fields]
        sync = [pool.submit(client.post, f"/{T2I}", json=f) for f in sync_fields]
        wait_until(lambda: any(any(m.startswith("step ") for m in logs_of(client, q)) for q in queued), 120,
                   "a queued request to be denoising")
        lost_at = time.monotonic()
        cluster.remove(cluster.gpu_nodes[0])
        outputs, logs = [], []
        for future in sync:  # no connection died with the node: each answers 200
            response = future.result()
            assert response.status_code == 200, response.text
            outputs.append(response.json())
        for request_id in queued:
            status = wait_status(client, request_id, lambda b: b["status"] == "COMPLETED", timeout_s=300)
            assert "error" not in status, (status.get("error_type"), status.get("error"), logs_of(client, request_id))
            outputs.append(client.get(f"{REQUESTS}/{request_id}").json())
            logs.append(logs_of(client, request_id))
        recovered_s = time.monotonic() - lost_at
        for fields, output in zip(sync_fields + queued_fields, outputs):
            assert_reference_pixels(client, reference, fields, output)
    assert any("Splitting 2 images over 2 Denoiser replicas: 1, 1" in line for lines in logs for line in lines)
    assert any(any(m.startswith("Retrying: a model replica stopped") for m in lines) for lines in logs)
    print(f"all requests done {recovered_s:.1f} s after the node loss")
    serve.shutdown()


def drain(cluster: LocalCluster, node_id: str, notice_s: int) -> None:
    """Ray's drain API with a deadline: what KubeRay's autoscaler and a preempted pod's notice call."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    deadline_ms = int((time.time() + notice_s) * 1000)
    accepted, why = GcsClient(address=cluster.cluster.address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot preemption", deadline_ms)
    assert accepted, why


def test_a_preempted_node_hands_its_work_over_within_the_notice(cluster, reference):
    """One Denoiser, a spare GPU node: the Denoiser's node is drained with 30 s of notice while
    requests run. Serve starts a replica on the spare node, the drained one finishes what it holds
    and stops; nothing runs twice, nothing fails; the node is removed at the deadline."""
    while len(cluster.gpu_nodes) < 2:
        cluster.add_gpu_node()
    deploy(cluster, {"deployment_options": cluster_options(1)})
    (node,) = replica_nodes("Denoiser")
    queued_fields, sync_fields = [body(20 + i, steps=12) for i in range(3)], [body(23 + i, steps=12) for i in range(2)]
    with httpx.Client(base_url=cluster.base, timeout=300) as client, ThreadPoolExecutor(2) as pool:
        queued = [client.post(f"/queue/{T2I}", json=f).json()["request_id"] for f in queued_fields]
        sync = [pool.submit(client.post, f"/{T2I}", json=f) for f in sync_fields]
        wait_until(lambda: any(any(m.startswith("step ") for m in logs_of(client, q)) for q in queued), 120,
                   "a queued request to be denoising")
        noticed = time.monotonic()
        drain(cluster, node, notice_s=30)
        wait_until(lambda: replica_nodes("Denoiser") not in ([], [node]), 60, "a replica on the spare node")
        moved_s = time.monotonic() - noticed
        outputs = [future.result() for future in sync]
        assert [r.status_code for r in outputs] == [200, 200], [r.text for r in outputs]
        logs = []
        for request_id in queued:
            status = wait_status(client, request_id, lambda b: b["status"] == "COMPLETED", timeout_s=120)
            assert "error" not in status, status
            logs.append(logs_of(client, request_id))
        done_s = time.monotonic() - noticed
        assert done_s < 30, f"work still running {done_s:.1f} s after a 30 s notice"
        assert not any(m.startswith("Retrying") for lines in logs for m in lines), logs
        for fields, response in zip(sync_fields, outputs):
            assert_reference_pixels(client, reference, fields, response.json())
        for fields, request_id in zip(queued_fields, queued):
            assert_reference_pixels(client, reference, fields, client.get(f"{REQUESTS}/{request_id}").json())
    cluster.remove(next(n for n in cluster.gpu_nodes if n.node_id == node))  # the deadline: the node goes
    print(f"replica moved {moved_s:.1f} s and every request done {done_s:.1f} s after the notice")
    serve.shutdown()
