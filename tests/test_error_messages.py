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
