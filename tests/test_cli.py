"""`srpo generate` as a user runs it: a subprocess on the tiny preset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from api.schemas import PRESET_SIZES

ROOT = Path(__file__).resolve().parents[1]


def _srpo(*args: str, tiny_root: Path, cwd: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRPO_")} | {"SRPO_TINY_DIR": str(tiny_root)}
    env |= settings
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_the_size_presets(tiny_root, tmp_path):
    result = _srpo("generate", "--help", tiny_root=tiny_root, cwd=tmp_path)
    assert result.returncode == 0
    assert all(name in result.stdout for name in PRESET_SIZES)


def test_user_mistakes_are_one_line_errors_with_exit_code_2(tiny_root, tmp_path):
    for args, expected in [(("--image", str(tmp_path / "missing.png")), "missing.png"),
                           (("--size", "big"), "WIDTHxHEIGHT"),
                           (("--image", __file__), "not a readable image")]:
        result = _srpo("generate", "a fox", *args, tiny_root=tiny_root, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("srpo generate: error:")]
        assert expected in line


def test_generate_writes_the_servers_default_format_and_shows_progress(tiny_root, tmp_path):
    result = _srpo("generate", "a fox", "--size", "32x32", "--steps", "2", "--seed", "3", "--out", "out",
                   tiny_root=tiny_root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (written,) = (tmp_path / "out").iterdir()
    assert written.name == "srpo-3-0.jpeg" and written.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG's magic
    assert "2/2" in result.stderr  # the progress bar's last state
    assert "0step [" not in result.stderr  # the bar starts knowing the step count (not "0step [00:00, ?step/s]")


def test_check_weights_names_every_missing_part(tiny_root, tmp_path):
    model, safety = shutil.copytree(tiny_root / "model", tmp_path / "flux-dev"), tiny_root / "safety_checker"
    complete = _srpo("check-weights", tiny_root=tiny_root, cwd=tmp_path, SRPO_MODEL_DIR=str(model),
                     SRPO_SAFETY_DIR=str(safety))
    assert complete.returncode == 0 and '"complete": true' in complete.stdout, complete.stderr
    shutil.rmtree(model / "vae")
    broken = _srpo("check-weights", tiny_root=tiny_root, cwd=tmp_path, SRPO_MODEL_DIR=str(model),
                   SRPO_SAFETY_DIR=str(tmp_path), SRPO_TRANSFORMER_FILE=str(tmp_path / "srpo.safetensors"))
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    (line,) = [line for line in broken.stderr.splitlines() if line.startswith("srpo check-weights: error:")]
    for missing in ("vae/config.json", f"transformer file {tmp_path / 'srpo.safetensors'}", "preprocessor_config.json"):
        assert missing in line, line
