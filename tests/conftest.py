from __future__ import annotations

import os
from pathlib import Path

import pytest
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
