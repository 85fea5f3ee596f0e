"""A refusal that comes from a limit of this deployment names the setting that changes it."""

from __future__ import annotations

import base64
from typing import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from models.pipeline import SRPOPipeline
from server.app import build_app
from server.service import InProcessBackend, SRPOService
from settings import get_settings
from tests.conftest import CPU

SMALL = {"prompt": "x", "image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def client(tiny_model_dir, tiny_safety_dir, tmp_path_factory) -> Iterator[TestClient]:
    pipeline = SRPOPipeline(tiny_model_dir, tiny_safety_dir, CPU, torch.float32)
    state = tmp_path_factory.mktemp("errors")
    settings = get_settings().model_copy(update={
        "storage_dir": state / "files", "queue_db_path": state / "requests.sqlite3",
        "image_fetch_max_bytes": 1024, "max_pixels": 64 * 64, "max_body_bytes": 4096})
    with TestClient(build_app(SRPOService(InProcessBackend(pipeline), settings))) as client:
        yield client


def _detail(response) -> str:
    return str(response.json()["detail"])


def test_limits_name_their_settings(client):
    too_big_image = "data:image/png;base64," + base64.b64encode(b"\0" * 2000).decode()
    cases = [
        (client.post("/fal-ai/flux/srpo/image-to-image", json={"prompt": "x", "image_url": too_big_image}),
         422, "SRPO_IMAGE_FETCH_MAX_BYTES"),
        (client.post("/fal-ai/flux/srpo", json=SMALL | {"image_size": {"width": 128, "height": 128}}),
         422, "SRPO_MAX_PIXELS"),
        (client.post("/fal-ai/flux/srpo", json=SMALL | {"prompt": "x" * 5000}), 413, "SRPO_MAX_BODY_BYTES"),
        (client.post("/queue/fal-ai/flux/srpo?fal_max_queue_length=0", json=SMALL), 429, "SRPO_QUEUE_MAX_PENDING"),
        (client.post("/fal-ai/flux/srpo/image-to-image", json={"prompt": "x", "image_url": "http://127.0.0.1:9/a.png"}),
         422, "SRPO_IMAGE_URL_ALLOWED_NETWORKS"),
    ]
    for response, status, setting in cases:
        assert response.status_code == status and setting in _detail(response), response.text


def test_one_clear_message_per_mistake_on_fal_routes_and_v1(client):
    fal_cases = [  # (route, body, loc, message)
        ("/fal-ai/flux/srpo", {"prompt": "x", "image_size": "huge"}, ["body", "image_size"],
         "Input should be 'square_hd', 'square', 'portrait_4_3', 'portrait_16_9', 'landscape_4_3' or 'landscape_16_9'"),
        ("/queue/fal-ai/flux/srpo", {"prompt": "x", "image_size": 5}, ["body", "image_size"],
         "Input should be a preset name or an object {width, height}"),
        ("/fal-ai/flux/srpo", {"prompt": "x", "image_size": {"width": 0, "height": 64}}, ["body", "image_size", "width"],
         "Input should be greater than or equal to 1"),
        ("/fal-ai/flux/srpo/image-to-image", {"prompt": "x", "image_url": "ftp://host/a.png"}, ["body", "image_url"],
         "image_url must be an http(s) URL or a data: URI"),
    ]
    for route, body, loc, message in fal_cases:
        response = client.post(route, json=body)
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert (error["loc"], error["msg"]) == (loc, message)
    openai_cases = [
        ({"prompt": "x", "size": "huge"}, "Invalid value for 'size': size must be 'auto' or WIDTHxHEIGHT such as "
                                          "1024x768, not 'huge'"),
        ({"prompt": "x", "size": "100x100"}, "Invalid value for 'size': size 100x100: each side must be a multiple "
                                             "of 16, at least 64"),
    ]
    for body, message in openai_cases:
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 400 and response.json()["error"]["message"] == message, response.text
