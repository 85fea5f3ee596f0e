"""A local Ray + Serve instance running the app on 127.0.0.1 (tests and benchmarks)."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import ray
from ray import serve

from deployments.app import build_app

APP_NAME = "srpo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_serve(env: dict[str, str], args: dict[str, Any] | None = None) -> Iterator[str]:
    """Start Ray + Serve on 127.0.0.1 with `env` for every replica; yield the base URL."""
    port = free_port()
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args or {}), name=APP_NAME, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
            time.sleep(0.5)
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


def tiny_env(tiny_root: Path, storage: Path, **extra: str) -> dict[str, str]:
    return {"SRPO_TINY_DIR": str(tiny_root), "SRPO_STORAGE_DIR": str(storage), **extra}
