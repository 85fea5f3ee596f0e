"""A multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`: a raylet per node, each with
its own resources) running the app as it runs on KubeRay: the controller, the ingress and the CPU
stages on the head, the Denoisers on "GPU" nodes marked with a custom resource standing in for GPUs.

Nodes are added and removed at will (a lost spot node), drained through Ray's drain API (a
preemption notice) and the GCS can be restarted against an external Redis (GCS fault tolerance).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import ray
from ray import serve
from ray._private.node import Node
from ray.cluster_utils import Cluster

from deployments.app import build_app
from tests.harness import APP_NAME, free_port

GPU = "denoiser_gpu"  # the custom resource a "GPU" node offers (one per node: one Denoiser each)
HEAD = "node:__internal_head__"  # Ray's resource of the head node: pins the CPU stages there
HEAD_STAGES = ("Ingress", "TextEncoder", "Decoder")


def cluster_options(denoisers: int, denoiser: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """`deployment_options` placing the Denoisers on GPU nodes and the other stages on the head."""
    options: dict[str, dict[str, Any]] = {
        name: {"ray_actor_options": {"num_cpus": 0.25, "resources": {HEAD: 0.01}}} for name in HEAD_STAGES}
    options["Denoiser"] = {"num_replicas": denoisers,
                           "ray_actor_options": {"num_cpus": 0.5, "resources": {GPU: 1}}} | (denoiser or {})
    return options


@dataclass
class LocalCluster:
    cluster: Cluster
    port: int  # the head's proxy
    gpu_nodes: list[Node] = field(default_factory=list)
    proxy_ports: dict[str, int] = field(default_factory=dict)  # by node id, the head's included

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_gpu_node(self) -> Node:
        """A node with one GPU slot; its Serve proxy (when it runs one) on a port of its own: every
        node here shares 127.0.0.1, where KubeRay's pods each have an address."""
        port = free_port()
        node = self.cluster.add_node(num_cpus=1, resources={GPU: 1},
                                     env_vars={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(port)})
        self.gpu_nodes.append(node)
        self.proxy_ports[node.node_id] = port
        return node

    def remove(self, node: Node) -> None:
        """The node is gone at once (a spot instance reclaimed): its processes are SIGKILLed."""
        self.gpu_nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)


@contextmanager
def local_cluster(env: dict[str, str], gpu_nodes: int = 2, **head_args: Any) -> Iterator[LocalCluster]:
    """A head node and `gpu_nodes` GPU nodes; the driver connected with `env` for every replica.
    Ray's files (and its "current cluster" address file) live in a directory of their own, so no
    other Ray instance on this machine connects to this one by accident; under /tmp, as Ray's
    socket paths must stay within 107 bytes."""
    saved, tmp = os.environ.get("RAY_TMPDIR"), tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False,
        **head_args})
    local = LocalCluster(cluster, port)
    try:
        local.proxy_ports[cluster.head_node.node_id] = port
        for _ in range(gpu_nodes):
            local.add_gpu_node()
        ray.init(address=cluster.address, runtime_env={"env_vars": env}, logging_level="WARNING", log_to_driver=False)
        yield local
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved


def deploy(local: LocalCluster, args: dict[str, Any], proxy_location: str = "HeadOnly", timeout_s: float = 180) -> None:
    """Serve on the cluster (the head's proxy on `local.port`) and the app; returns once /health is 200."""
    serve.start(proxy_location=proxy_location, http_options={"host": "127.0.0.1", "port": local.port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    wait_healthy(local.base, timeout_s)


def wait_healthy(base: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{base} never became healthy")


def _named_serve_actors(part: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and part in a["name"]]


def _node_of(name: str) -> str:
    actor = ray.get_actor(name, namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()), timeout=30)


def replica_nodes(deployment: str) -> list[str]:
    """The node ids of a deployment's replicas."""
    return sorted(_node_of(name) for name in _named_serve_actors(f"#{deployment}#"))


def proxy_nodes() -> list[str]:
    """The node ids of the running Serve proxies (alive: a proxy of a removed node may keep its name)."""
    nodes = []
    for name in _named_serve_actors("PROXY_ACTOR"):
        try:
            nodes.append(_node_of(name))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            continue
    return sorted(nodes)
