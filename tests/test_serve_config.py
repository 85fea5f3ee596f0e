"""The README's serve command: `serve run serve_config.yaml` brings up a ready graph on the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from deployments.app import AppArgs, Decoder, Denoiser, Ingress, TextEncoder
from tests.harness import default_config_copy

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = {"Ingress", "TextEncoder", "Denoiser", "Decoder"}


def test_configs_name_only_real_deployments_and_valid_args():
    for name in ("serve_config.yaml", "serve_config.1gpu.yaml", "serve_config.gpu.yaml"):
        config = yaml.safe_load((ROOT / name).read_text())
        (app,) = config["applications"]
        assert app["import_path"] == "deployments.app:build_app"
        AppArgs.model_validate(app["args"])
        assert {d["name"] for d in app["deployments"]} == DEPLOYMENTS
        assert all("autoscaling_config" in d for d in app["deployments"])
    assert {d.name for d in (Ingress, TextEncoder, Denoiser, Decoder)} == DEPLOYMENTS


def test_default_config_fits_a_2_core_machine():
    """Every replica the autoscaler may ask for can be placed: no 'cannot be scheduled' warnings."""
    (app,) = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    cpus = sum(d["ray_actor_options"]["num_cpus"] * d["autoscaling_config"]["max_replicas"] for d in app["deployments"])
    assert cpus <= 2


def test_serve_run_serves_the_default_config(tmp_path, tiny_root):
    path, port, env = default_config_copy(tmp_path, tiny_root)
    serve_bin = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_bin), "run", str(path)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, ready = time.monotonic() + 120, False
        while time.monotonic() < deadline and not ready:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert ready, "serve run never reported a healthy graph"
        response = httpx.post(f"http://127.0.0.1:{port}/fal-ai/flux/srpo",
                              json={"prompt": "hello", "num_inference_steps": 2}, timeout=60)
        assert response.status_code == 200
        assert (response.json()["images"][0]["width"], response.json()["images"][0]["height"]) == (1024, 768)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
