from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
import torch

from models.tiny import ensure_tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.getbasetemp() / "tiny"
    ensure_tiny_model(root)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_root: Path) -> Path:
    return tiny_root / "model"


@pytest.fixture(scope="session")
def tiny_safety_dir(tiny_root: Path) -> Path:
    return tiny_root / "safety_checker"


@pytest.fixture(autouse=True)
def _tiny_settings_env(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every settings read at the session's tiny preset, never at a user's folders."""
    from settings import get_settings

    for key in list(os.environ):
        if key.startswith("SRPO_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SRPO_TINY_DIR", str(tiny_root))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on 127.0.0.1 (installed by .ci/run), without persistence."""
    from tests.harness import free_port

    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        for _ in range(100):
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)
