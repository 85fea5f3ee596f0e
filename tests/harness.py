"""A real Ray + Serve instance running the app on 127.0.0.1, for the tests and the benchmarks."""

from __future__ import annotations

import os
import random
import subprocess
import socket
import ssl
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import ray
import redis
import yaml
from ray import serve
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from deployments.app import build_app
from deployments.launch import data_plane_env

APP_NAME = "srpo"
# Serve's own proxy (one machine's default) and the HAProxy ingress with the throughput-optimized data
# plane (what the Kubernetes manifests ship): the tests of what clients see run on both.
DATA_PLANES = ("serve-proxy", "haproxy")
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Above Ray's worker ports (10002-19999 by default) and below the kernel's ephemeral range: a port the
# kernel hands out (bind to 0) can be taken again as the source port of one of Ray's own connections
# before the server meant for it binds (a cluster test's proxy once failed with "Address already in use").
PORT_RANGE = (20000, _ephemeral_low())
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, outside the ranges Ray and the kernel pick ports from."""
    for _ in range(1000):
        port = random.randrange(*PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


@contextmanager
def running_serve(
    env: dict[str, str],
    args: dict[str, Any] | None = None,
    tls: tuple[Path, Path, Path] | None = None,
    secrets: dict[str, str] | None = None,
    metrics_port: int | None = None,
    config: dict[str, Any] | None = None,
    data_plane: str | None = None,
) -> Iterator[str]:
    """Start Ray + Serve on 127.0.0.1 with `env` for every replica; yield the base URL.

    `config`: a Serve config (`shipped_config`) whose applications are deployed the way KubeRay applies
    `serveConfigV2` (`deploy_config`) instead of `build_app(args)` through `serve.run`.

    `tls` is (certificate, key, CA that signed it): Serve's proxy then speaks HTTPS. `secrets` reach the replicas
    through the process environment they inherit, not the runtime_env, which Ray logs. `metrics_port`: the
    node's Prometheus endpoint (`http://127.0.0.1:<port>/metrics`), on a random port when None. `data_plane`:
    one of DATA_PLANES, else as the environment says (`deployments/launch.py`).
    """
    port = free_port()
    http_options: dict[str, Any] = {"host": "127.0.0.1", "port": port}
    if tls is not None:
        http_options |= {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])}
    scheme = "https" if tls else "http"
    # Serve's data plane as it ships (deployments/launch.py); it reaches Ray's processes through the
    # environment they inherit, like the secrets.
    process_env = (secrets or {}) | _data_plane_env(http_options, data_plane)
    saved = {key: os.environ.get(key) for key in process_env}
    os.environ.update(process_env)
    try:
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            runtime_env={"env_vars": env},
            logging_level="WARNING",
            log_to_driver=False,
            _metrics_export_port=metrics_port,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        serve.start(http_options=http_options)
        if config is None:
            serve.run(build_app(args or {}), name=APP_NAME, route_prefix="/")
        else:
            deploy_config(config)
            wait_until(app_running, 300, "the application to be RUNNING")
        base = f"{scheme}://127.0.0.1:{port}"
        verify = ssl.create_default_context(cafile=str(tls[2])) if tls else True
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if httpx.get(f"{base}/health", timeout=5, verify=verify).status_code == 200:
                break
            time.sleep(0.5)
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


def shipped_config(env: dict[str, str]) -> dict[str, Any]:
    """serve_config.yaml with `env` in the application's runtime_env."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["applications"][0]["runtime_env"] = {"env_vars": env}
    return config


def config_deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The entry of deployment `name` in a Serve config's one application."""
    (app,) = config["applications"]
    return next(d for d in app["deployments"] if d["name"] == name)


def deploy_config(config: dict[str, Any]) -> None:
    """Send a Serve config's applications to Serve's controller, as KubeRay applies `serveConfigV2`;
    Serve moves to it in the background (in place, or rolling: docs/operations.md)."""
    serve.context._get_global_client().deploy_apps(ServeDeploySchema(applications=config["applications"]))


def app_running() -> bool:
    app = serve.status().applications.get(APP_NAME)
    return app is not None and app.status == ApplicationStatus.RUNNING


def _data_plane_env(http_options: dict[str, Any], data_plane: str | None) -> dict[str, str]:
    """`data_plane_env` (or the one asked for), with this run's own HAProxy files and ports: several Ray
    instances share the machine."""
    env = data_plane_env(http_options, None if data_plane is None else data_plane == "haproxy")
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        run_dir = Path(tempfile.mkdtemp(prefix="hap-"))  # short: the admin socket's path has a length limit
        env = env | {
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(run_dir / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(run_dir / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(run_dir),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(run_dir / "server-state"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        }
    return env


def start_redis(port: int, folder: Path) -> subprocess.Popen:
    """A redis-server on 127.0.0.1 that keeps its data in an append-only file in `folder`: stopped with
    SIGTERM and started again on the same port and folder, it has lost nothing (a restarted Redis)."""
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
         "--appendfsync", "always", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    wait_until(lambda: _answers(client), 10, "redis-server")
    return server


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def tiny_env(tiny_root: Path, storage: Path, **extra: str) -> dict[str, str]:
    """Replica settings for the tiny preset, with outputs and the embedded queue under `storage`."""
    return {
        "SRPO_TINY_DIR": str(tiny_root),
        "SRPO_STORAGE_DIR": str(storage / "files"),
        "SRPO_QUEUE_DB_PATH": str(storage / "queue" / "requests.sqlite3"),
        **extra,
    }


def denoiser_stats(replicas: int) -> dict[str, dict]:
    """`Denoiser.stats` of each of `replicas` replicas, by replica (a call reaches any one: ask until
    each has answered)."""
    handle = serve.get_deployment_handle("Denoiser", APP_NAME)
    seen: dict[str, dict] = {}
    for _ in range(100):
        stats = handle.stats.remote().result()
        seen[stats["replica"]] = stats
        if len(seen) == replicas:
            return seen
    raise AssertionError(f"only {len(seen)} of {replicas} Denoiser replicas answered")


def wait_until(predicate, timeout_s: float, what: str) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def default_config_copy(tmp_path: Path, tiny_root: Path) -> tuple[Path, int, dict[str, str]]:
    """serve_config.yaml on a free port, written under `tmp_path`, and the environment that keeps the
    tiny preset's outputs and queue there: (config path, port, env) for a subprocess."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = os.environ | {"SRPO_TINY_DIR": str(tiny_root), "SRPO_STORAGE_DIR": str(tmp_path / "files"),
                        "SRPO_QUEUE_DB_PATH": str(tmp_path / "requests.sqlite3")}
    return path, port, env

