"""The project's metrics as Prometheus scrapes them: a real Serve app on the tiny model, real requests,
Ray's real metrics endpoint; and the Grafana dashboard and alert rules name only metrics that exist."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from api.schemas import TextToImageInput
from models.pipeline import SRPOPipeline
from safety.tiny import write_tiny_safety_checker
from server.service import to_generation_request
from tests import loras
from tests.conftest import CPU
from tests.harness import free_port, running_serve, tiny_env
from tests.queue_helpers import slow, small, step_logs, wait_status
from tests.test_fault_tolerance import sigkill

MONITORING = Path(__file__).resolve().parents[1] / "k8s" / "components" / "monitoring"
FLAGGED = {"prompt": "the one the checker flags", "seed": 777, "image_size": {"width": 256, "height": 256},
           "num_inference_steps": 2}  # sync text-to-image: 2 steps, its one image flagged
QUEUED = small(prompt="a queued fox", num_images=2, num_inference_steps=3, enable_safety_checker=False)
I2I_STEPS = 10  # strength 1: every step runs
SCRAPE_TIMEOUT_S = 60
STAGES = ("text_encoder", "denoiser", "decoder")
Sample = tuple[str, dict[str, str], float]


class Scrape:
    """One scrape of the node's metrics endpoint: every sample, summed over replicas on request."""

    def __init__(self, text: str) -> None:
        self.samples: list[Sample] = [
            (s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
        ]
        self.names = {name for name, _, _ in self.samples}

    def value(self, name: str, **labels: str) -> float:
        return sum(v for n, tags, v in self.samples if n == name and labels.items() <= tags.items())

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and labels.items() <= tags.items() for n, tags, _ in self.samples)


def scrape_until(metrics_url: str, ready: Callable[[Scrape], bool], what: str) -> Scrape:
    """Scrape until `ready` holds: Ray exports each process's metrics every report interval."""
    deadline, last = time.monotonic() + SCRAPE_TIMEOUT_S, None
    while time.monotonic() < deadline:
        last = Scrape(httpx.get(metrics_url, timeout=10).text)
        if ready(last):
            return last
        time.sleep(0.2)
    missing = sorted(n for n in (last.names if last else ()) if "srpo" in n)
    raise AssertionError(f"timed out waiting for {what}; srpo series scraped: {missing}")


def data_uri(side: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(5).rand(side, side, 3) * 255).astype(np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def safety_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny safety checker that flags exactly FLAGGED's image."""
    reference = SRPOPipeline(tiny_model_dir, None, CPU, torch.float32)
    image = reference.generate(to_generation_request(TextToImageInput(**FLAGGED), FLAGGED["seed"]), False).images[0]
    return write_tiny_safety_checker(tmp_path_factory.mktemp("safety"), flagged=image, threshold=0.999)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    loras.diffusers_lora(folder / "style.safetensors", 3, text_encoder=True)
    return folder


@pytest.fixture(scope="module")
def scrapes(tiny_root, safety_dir, lora_dir, tmp_path_factory) -> Iterator[dict[str, Scrape]]:
    """Traffic of known shape, then a Denoiser SIGKILLed mid-request: a scrape after each."""
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    env = tiny_env(tiny_root, tmp_path_factory.mktemp("metrics"), SRPO_SAFETY_DIR=str(safety_dir),
                   SRPO_LORA_DIR=str(lora_dir), SRPO_LORA_CACHE_DIR=str(tmp_path_factory.mktemp("lora_cache")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_metrics_report_interval_ms", "500")  # Ray's processes inherit it (default 10 s)
        # Serve sets its replica-health gauge every 10 s, longer than a gauge lives at that interval.
        patch.setenv("RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S", "0")
        with running_serve(env, metrics_port=metrics_port) as base, httpx.Client(base_url=base, timeout=120) as client:
            yield {"traffic": traffic(client, metrics_url), "retry": retry(client, metrics_url)}


def traffic(client: httpx.Client, metrics_url: str) -> Scrape:
    flagged = client.post("/fal-ai/flux/srpo", json=FLAGGED)
    assert flagged.status_code == 200 and flagged.json()["has_nsfw_concepts"] == [True], flagged.text
    submitted = client.post("/queue/fal-ai/flux/srpo", json=QUEUED)
    assert submitted.status_code == 200, submitted.text
    i2i = client.post("/fal-ai/flux/srpo/image-to-image", json=small(
        prompt="a painted fox", image_url=data_uri(64), strength=1.0, num_inference_steps=I2I_STEPS,
        loras=[{"path": "style"}]))  # a LoRA with a CLIP part: both tiers of both stages count it
    assert i2i.status_code == 200, i2i.text
    invalid = client.post("/fal-ai/flux/srpo", json=small(num_inference_steps=0))
    assert invalid.status_code == 422 and invalid.headers["x-fal-error-type"] == "input_error"
    wait_status(client, submitted.json()["request_id"], lambda b: b["status"] == "COMPLETED")

    def exported(s: Scrape) -> bool:  # each process's last records, so everything before them too
        stages = [s.value("ray_srpo_stage_latency_seconds_count", stage=n) for n in STAGES]
        return (stages == [3, 3, 3] and s.value("ray_srpo_requests_total") == 4
                and s.has("ray_srpo_num_requests_running", mode="queue")
                and s.value("ray_srpo_num_requests_running", mode="queue") == 0)

    return scrape_until(metrics_url, exported, "the traffic's metrics")


def retry(client: httpx.Client, metrics_url: str) -> Scrape:
    """A queued request whose Denoiser dies mid-denoising runs again."""
    doomed = slow() | {"prompt": "a doomed fox", "enable_safety_checker": False}
    request_id = client.post("/queue/fal-ai/flux/srpo", json=doomed).json()["request_id"]
    wait_status(client, request_id, lambda b: step_logs(b))
    sigkill("Denoiser")
    done = wait_status(client, request_id, lambda b: b["status"] == "COMPLETED", timeout_s=120)
    assert any(e["message"].startswith("Retrying") for e in done["logs"]), done["logs"]
    return scrape_until(metrics_url, lambda s: s.value("ray_srpo_requests_total") == 5, "the retried request")


def test_request_queue_and_error_metrics(scrapes):
    s = scrapes["traffic"]
    ok = {"outcome": "ok"}
    assert s.value("ray_srpo_requests_total", endpoint="text-to-image", mode="sync", **ok) == 1
    assert s.value("ray_srpo_requests_total", endpoint="text-to-image", mode="queue", **ok) == 1
    assert s.value("ray_srpo_requests_total", endpoint="image-to-image", mode="sync", **ok) == 1
    assert s.value("ray_srpo_requests_total", endpoint="text-to-image", mode="sync", outcome="error") == 1
    assert s.value("ray_srpo_request_errors_total") == 1
    input_error = {"endpoint": "text-to-image", "mode": "sync", "error_type": "input_error"}
    assert s.value("ray_srpo_request_errors_total", **input_error) == 1
    for tags in ({"mode": "sync", **ok}, {"mode": "queue", **ok}, {"outcome": "error"}):
        latencies = s.value("ray_srpo_e2e_request_latency_seconds_count", **tags)
        assert latencies == s.value("ray_srpo_requests_total", **tags)
        assert s.value("ray_srpo_e2e_request_latency_seconds_sum", **tags) > 0
    # Ray's exported histogram sums are estimates from the buckets: only counts are exact.
    assert s.value("ray_srpo_request_queue_time_seconds_count") == 1
    assert s.value("ray_srpo_request_queue_time_seconds_sum") > 0
    assert s.value("ray_srpo_num_requests_waiting") == 0
    assert s.has("ray_srpo_num_requests_running", mode="sync") and s.value("ray_srpo_num_requests_running") == 0
    assert s.value("ray_srpo_images_generated_total") == 1 + 2 + 1
    assert s.value("ray_srpo_nsfw_flagged_images_total") == 1
    assert not s.has("ray_srpo_request_retries_total")


def test_stage_and_denoiser_metrics(scrapes):
    s = scrapes["traffic"]
    for stage in STAGES:  # the three requests that reached the model
        assert s.value("ray_srpo_stage_latency_seconds_count", stage=stage) == 3, stage
        assert s.value("ray_srpo_stage_latency_seconds_sum", stage=stage) > 0, stage
    steps = [FLAGGED["num_inference_steps"], QUEUED["num_inference_steps"], I2I_STEPS]
    samples = [1, QUEUED["num_images"], 1]
    # One step interval per step after a request's first.
    assert s.value("ray_srpo_diffusion_step_seconds_count") == sum(steps) - len(steps)
    assert s.value("ray_srpo_diffusion_step_seconds_sum") > 0
    sample_steps = sum(n * k for n, k in zip(steps, samples))
    forwards = s.value("ray_srpo_batch_size_count", stage="denoiser")
    assert 1 <= forwards <= sum(steps) and s.value("ray_srpo_batch_size_sum", stage="denoiser") == sample_steps
    # No step cache on a CPU ("regular" falls back to "none"): every sample-step computed.
    assert s.value("ray_srpo_step_cache_sample_steps_total", result="computed") == sample_steps
    assert not s.has("ray_srpo_step_cache_sample_steps_total", result="reused")
    assert s.value("ray_srpo_batch_size_count", stage="text_encoder") >= 1
    assert s.value("ray_srpo_batch_size_sum", stage="decoder") == 3
    for stage in ("denoiser", "text_encoder"):  # the image-to-image request's one LoRA, loaded once
        for tier in ("host", "device"):
            assert s.value("ray_srpo_lora_cache_events_total", stage=stage, tier=tier, result="miss") == 1, stage
        assert s.value("ray_srpo_lora_load_seconds_count", stage=stage) == 1, stage
        assert s.value("ray_srpo_lora_resident_adapters", stage=stage) == 1, stage


def test_a_replica_failure_counts_a_retry(scrapes):
    s = scrapes["retry"]
    assert s.value("ray_srpo_request_retries_total", reason="replica_failure") == 1
    assert s.value("ray_srpo_requests_total", mode="queue", outcome="ok") == 2


PROMQL_NOT_METRICS = re.compile(r"\{[^}]*\}|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads: ours and Ray's all start with `ray_` (label matchers and
    grouping clauses removed first, since a label such as ray_io_cluster starts so too)."""
    return set(re.findall(r"\bray_[A-Za-z0-9_:]+", PROMQL_NOT_METRICS.sub(" ", expr)))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def alert_exprs() -> dict[str, str]:
    (rule,) = [d for d in yaml.safe_load_all((MONITORING / "prometheus-rules.yaml").read_text())
               if d["kind"] == "PrometheusRule"]
    return {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}


def test_dashboard_and_alerts_read_only_exported_metrics(scrapes):
    scraped = scrapes["traffic"].names | scrapes["retry"].names
    exprs = dashboard_exprs() + list(alert_exprs().values())
    for expr in exprs:
        names = metric_names(expr)
        assert names and names <= scraped, (expr, names - scraped)
    # Every metric of ours has a panel (a histogram through its buckets, sum or count).
    ours = {re.sub(r"_(bucket|sum|count)$", "", n) for n in scraped if n.startswith("ray_srpo_")}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for expr in dashboard_exprs() for n in metric_names(expr)}
    assert ours <= shown, ours - shown
    assert {"SRPOBacklogHigh", "SRPOBacklogGrowing", "SRPOErrorRateHigh", "SRPOLatencyP99High",
            "SRPONoReadyDenoiser"} <= alert_exprs().keys()


def test_metric_names_are_parsed_from_promql():
    expr = ('histogram_quantile(0.99, sum by (le, endpoint) (rate(ray_srpo_e2e_request_latency_seconds_bucket'
            '{ray_io_cluster=~"$cluster"}[5m]))) / on (ray_io_cluster) ray_serve_deployment_replica_healthy')
    assert metric_names(expr) == {"ray_srpo_e2e_request_latency_seconds_bucket", "ray_serve_deployment_replica_healthy"}
