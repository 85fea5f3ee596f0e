"""Two Denoiser replicas behind the least-work router (a real Serve instance, tiny model on CPU):
work waits in front of the replicas, and a multi-image request splits over both when they are free,
with diffusers' pixels."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline
from PIL import Image

from scheduling.cost_model import CostModel, default_profile_path
from tests.harness import denoiser_stats, running_serve, tiny_env
from tests.pixels import assert_same_pixels, pixels
from tests.queue_helpers import REQUESTS, wait_status

SPLIT = {"prompt": "two lighthouses", "seed": 21, "num_images": 2, "image_size": {"width": 512, "height": 512},
         "num_inference_steps": 8, "guidance_scale": 3.5, "enable_safety_checker": False, "output_format": "png"}


@pytest.fixture(scope="module")
def server(tiny_root, tmp_path_factory):
    env = tiny_env(tiny_root, tmp_path_factory.mktemp("multi"))
    with running_serve(env, {"deployment_options": {"Denoiser": {"num_replicas": 2}}}) as base:
        yield base


def run_queued(client: httpx.Client, path: str, body: dict) -> tuple[dict, list[str]]:
    request_id = client.post(f"/queue/{path}", json=body).json()["request_id"]
    status = wait_status(client, request_id, lambda b: b["status"] == "COMPLETED", timeout_s=120)
    result = client.get(f"{REQUESTS}/{request_id}")
    assert result.status_code == 200, result.text
    return result.json(), [entry["message"] for entry in status["logs"]]


def forwards(stats: dict[str, dict], kind: str) -> dict[str, int]:
    """Forwards of one kind ("<image tokens>x<samples>") each replica has run."""
    return {key: replica["forward_seconds"].get(kind, [0])[0] for key, replica in stats.items()}


def split_run(client: httpx.Client, path: str, body: dict) -> dict:
    """Run `body` until a run splits (the Ingress plans a split once its router has heard from both
    replicas, a report period after its first call); check each replica ran one image of that run."""
    for _ in range(5):
        before = denoiser_stats(2)
        result, logs = run_queued(client, path, body)
        if "Splitting 2 images over 2 Denoiser replicas: 1, 1" in logs:
            after = denoiser_stats(2)
            singles, pairs = forwards(after, "1024x1"), forwards(after, "1024x2")
            assert all(singles[key] > count for key, count in forwards(before, "1024x1").items()), singles
            assert pairs == forwards(before, "1024x2"), pairs  # no replica ran the two as a pair
            return result
    raise AssertionError(f"a free pair of replicas never split the request; last logs: {logs}")


def test_two_free_replicas_each_denoise_one_image_of_a_pair_with_diffusers_pixels(server, tiny_model_dir):
    with httpx.Client(base_url=server, timeout=120) as client:
        result = split_run(client, "fal-ai/flux/srpo", SPLIT)
        got = [pixels(image["url"], client) for image in result["images"]]
    reference = FluxPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    want = reference(SPLIT["prompt"], height=512, width=512, num_inference_steps=8, guidance_scale=3.5,
                     num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(SPLIT["seed"])).images
    for image, expected in zip(got, want, strict=True):
        assert_same_pixels(image, np.asarray(expected))


def test_an_image_to_image_pair_splits_too_with_diffusers_pixels(server, tiny_model_dir):
    source = Image.fromarray((np.random.RandomState(5).rand(512, 512, 3) * 255).astype(np.uint8))
    body = {key: value for key, value in SPLIT.items() if key != "image_size"} | {
        "image_url": "data:image/png;base64," + encode_data(source), "strength": 0.75, "num_inference_steps": 10}
    with httpx.Client(base_url=server, timeout=120) as client:
        result = split_run(client, "fal-ai/flux/srpo/image-to-image", body)
        got = [pixels(image["url"], client) for image in result["images"]]
    reference = FluxImg2ImgPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    want = reference(SPLIT["prompt"], image=source, height=512, width=512, num_inference_steps=10, strength=0.75,
                     guidance_scale=3.5, num_images_per_prompt=2,
                     generator=torch.Generator("cpu").manual_seed(SPLIT["seed"])).images
    for image, expected in zip(got, want, strict=True):
        assert_same_pixels(image, np.asarray(expected))


def test_requests_wait_in_front_of_the_replicas_not_inside_them(server):
    # At 1024x576 the CPU profile says a pair costs no less than two singles, so batching never pays
    # and no replica widens its horizon for a batch: it admits the next request only when its backlog
    # is down to about a step plus the routing-stats delay, so it never holds more than two at once.
    cost = CostModel.load(default_profile_path("cpu"))
    assert cost.step_s(2304, 2) >= 2 * cost.step_s(2304, 1), "pick a size where batching does not pay"
    body = {"prompt": "queue in front", "image_size": {"width": 1024, "height": 576}, "num_inference_steps": 30,
            "sync_mode": True, "enable_safety_checker": False}
    with httpx.Client(base_url=server, timeout=300) as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: client.post("/fal-ai/flux/srpo", json=body | {"seed": i}), range(8)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
    stats = denoiser_stats(2)
    assert all(s["most_active"] <= 2 for s in stats.values()), {k: s["most_active"] for k, s in stats.items()}
    assert min(forwards(stats, "2304x1").values()) >= 30, stats  # both replicas took some of them


def encode_data(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
