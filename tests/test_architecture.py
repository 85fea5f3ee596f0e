"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject.toml) all pass."""

from __future__ import annotations

import os
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(monkeypatch):
    monkeypatch.chdir(ROOT)  # the contracts name top-level packages, found from the repository root
    assert lint_imports(config_filename=os.fspath(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0
