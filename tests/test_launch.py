"""`scripts/dev serve`'s launcher, as a user sees it: a banner once ready, request ids in the log, no
status-poll lines, and a quiet stop with exit code 0 (one Ray start, bounded)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import httpx

from deployments.launch import BANNER_RULE
from tests.harness import default_config_copy, wait_until

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"prompt": "x", "image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}


class Output:
    """A subprocess's merged output, read on a thread, that tests can wait on."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.text = ""
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        for line in proc.stdout:
            with self._changed:
                self.text += line
                self._changed.notify_all()

    def wait_for(self, found: Callable[[str], bool], timeout_s: float, what: str) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: found(self.text), timeout_s), f"no {what} in:\n{self.text}"


def whole_banner(text: str) -> bool:
    """The banner is one print, but the reader appends it line by line: wait for its closing rule."""
    _, ready, rest = text.partition("srpo-serve is ready\n")
    return bool(ready) and BANNER_RULE in rest


def test_launcher_banner_logs_and_quiet_stop(tmp_path, tiny_root):
    path, port, env = default_config_copy(tmp_path, tiny_root)
    proc = subprocess.Popen([sys.executable, "-m", "deployments.launch", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = Output(proc)
    base = f"http://127.0.0.1:{port}"
    try:
        output.wait_for(whole_banner, 300, "banner")
        assert f"API docs      {base}/docs" in output.text and "TINY RANDOM preset" in output.text
        request_id = httpx.post(f"{base}/queue/fal-ai/flux/srpo", json=SMALL, timeout=30).json()["request_id"]
        # Polled at wait_until's pace: a loop without a pause takes a core from the replicas doing the work.
        wait_until(lambda: httpx.get(f"{base}/queue/fal-ai/flux/requests/{request_id}/status").json()["status"]
                   == "COMPLETED", 120, "the queued request to complete")
        output.wait_for(lambda text: f"[{request_id}] generated 1 image(s)" in text, 60, "request-id log line")
        output.wait_for(lambda text: "POST /queue/fal-ai/flux/srpo 200" in text, 60, "submit's access-log line")
        assert "/status 20" not in output.text  # the polls above are not in the log
        assert "LongPollClient" not in output.text  # nor Serve's router starting, tagged with the request's id
        os.kill(proc.pid, signal.SIGTERM)  # what `docker stop` sends; Ctrl-C takes the same path
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output.wait_for(lambda text: text.rstrip().endswith("Stopped."), 10, "end of output")
    assert "Traceback" not in output.text and "graceful_shutdown failed" not in output.text


def test_a_mistyped_setting_stops_the_launcher_before_ray_starts(tmp_path, tiny_root):
    path, _, env = default_config_copy(tmp_path, tiny_root)
    env |= {"SRPO_IMAGE_URL_ALLOWED_NETWORKS": "127.0.0.0/8x", "SRPO_QUEUE_CONCURRENCY": "0"}
    result = subprocess.run([sys.executable, "-m", "deployments.launch", str(path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""  # not even "Starting srpo-serve ..."
    assert result.stderr.splitlines() == [
        "srpo-serve cannot start: invalid settings.",
        "  SRPO_IMAGE_URL_ALLOWED_NETWORKS=127.0.0.0/8x: '127.0.0.0/8x' is not a network (an address or "
        "address/prefix); for example SRPO_IMAGE_URL_ALLOWED_NETWORKS=127.0.0.1/32,10.0.0.0/8",
        "  SRPO_QUEUE_CONCURRENCY=0: Input should be greater than or equal to 1; for example SRPO_QUEUE_CONCURRENCY=8",
    ]


def test_stop_from_another_terminal_is_quiet_and_the_banner_says_where_metrics_are(tmp_path, tiny_root):
    path, _, env = default_config_copy(tmp_path, tiny_root)
    proc = subprocess.Popen([sys.executable, "-m", "deployments.launch", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = Output(proc)
    try:
        output.wait_for(whole_banner, 300, "banner")
        assert "(token: .venv/bin/ray get-auth-token)" in output.text
        (metrics,) = [line.split()[1] for line in output.text.splitlines() if line.startswith("  Metrics ")]
        assert "# TYPE ray_" in httpx.get(metrics, timeout=30).text
        serve = Path(sys.executable).with_name("serve")  # what `scripts/dev stop` runs
        subprocess.run([str(serve), "shutdown", "-y"], env=env | {"RAY_AUTH_MODE": "token"}, check=True,
                       capture_output=True, timeout=120)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output.wait_for(lambda text: text.rstrip().endswith("Stopped."), 10, "end of output")
    assert "Serve was shut down" in output.text
    assert "Traceback" not in output.text and "graceful_shutdown failed" not in output.text
