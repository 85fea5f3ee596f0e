"""`scripts/dev`: serving needs neither npm nor the test extras, and reinstalls only when pyproject.toml changes.

Runs the real script in a copy of the project whose `.venv` tools record their calls instead of installing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("bash", "sh", "env", "dirname", "sha256sum", "cut", "cat", "tr", "id")


def _project(tmp_path: Path, with_npm: bool) -> tuple[Path, dict[str, str]]:
    project, bin_dir = tmp_path / "project", tmp_path / "bin"
    (project / "scripts").mkdir(parents=True)
    (project / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    shutil.copy(ROOT / "scripts" / "dev", project / "scripts" / "dev")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    (project / "package.json").write_text("{}")
    calls = tmp_path / "calls"
    recorder = f'#!/bin/sh\necho "$(basename "$0") $*" >> {calls}\n'
    stubs = {project / ".venv" / "bin" / "pip": recorder, project / ".venv" / "bin" / "python": recorder,
             bin_dir / "redis-server": recorder}
    if with_npm:
        stubs[bin_dir / "npm"] = recorder
    for path, text in stubs.items():
        path.write_text(text)
        path.chmod(0o755)
    for tool in TOOLS + ("basename",):
        os.symlink(shutil.which(tool), bin_dir / tool)
    return project, {"PATH": str(bin_dir), "HOME": str(tmp_path)}


def _run(project: Path, env: dict[str, str], *args: str) -> list[str]:
    subprocess.run([str(project / "scripts" / "dev"), *args], env=env, check=True, timeout=60)
    return (project.parent / "calls").read_text().splitlines()


def test_serve_installs_only_serving_deps_once_and_needs_no_npm(tmp_path):
    project, env = _project(tmp_path, with_npm=False)
    _run(project, env, "serve")
    calls = _run(project, env, "serve")
    installs = [c for c in calls if c.startswith("pip install")]
    assert installs == ["pip install -q --disable-pip-version-check -e ."]  # once, no test extras
    assert calls.count("python -m deployments.launch serve_config.yaml") == 2
    with open(project / "pyproject.toml", "a") as f:
        f.write("\n# a dependency changed\n")
    assert len([c for c in _run(project, env, "serve") if c.startswith("pip install")]) == 2


def test_test_installs_the_test_extras_and_the_js_client(tmp_path):
    project, env = _project(tmp_path, with_npm=True)
    calls = _run(project, env, "test", "-q")
    assert "pip install -q --disable-pip-version-check -e .[test]" in calls
    assert "npm ci --silent" in calls and calls[-1] == "python -m pytest -q"
