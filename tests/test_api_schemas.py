"""Every input field's bounds, types and enums answered with the contract's 422, through the real HTTP app."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models.pipeline import SRPOPipeline
from server.app import build_app
from server.service import InProcessBackend, SRPOService
from settings import get_settings
from tests.conftest import CPU

T2I = "/fal-ai/flux/srpo"
I2I = "/fal-ai/flux/srpo/image-to-image"
def _png_data_uri(width: int = 32, height: int = 32) -> str:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype(np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


SOURCE = _png_data_uri()


@pytest.fixture(scope="module")
def client(tiny_model_dir, tiny_safety_dir, tmp_path_factory):
    pipeline = SRPOPipeline(tiny_model_dir, tiny_safety_dir, CPU, torch.float32)
    state = tmp_path_factory.mktemp("state")
    settings = get_settings().model_copy(update={"storage_dir": state / "files", "queue_db_path": state / "requests.sqlite3"})
    return TestClient(build_app(SRPOService(InProcessBackend(pipeline), settings)))


def _ok(**fields):
    return {"prompt": "a tiny test", "num_inference_steps": 1, "image_size": "square", "sync_mode": True} | fields


def _assert_422(response, field: str):
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-fal-request-id"]
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    for entry in detail:
        assert {"loc", "msg", "type"} <= entry.keys()
        assert entry["loc"][0] == "body"
    assert any(field in entry["loc"] for entry in detail), detail


# (field, accepted values at the bounds, rejected values just outside or of the wrong type)
T2I_CASES = [
    ("num_inference_steps", [1, 50], [0, 51, "many", 2.5, None]),
    ("guidance_scale", [1, 20, 1.0001], [0.999, 20.01, "high", None]),
    ("num_images", [1, 4], [0, 5, "two"]),
    ("seed", [0, -(2**63), 2**64 - 1], [2**64, -(2**63) - 1, "seed", 1.5]),
    ("sync_mode", [True, False], ["maybe", [1]]),
    ("enable_safety_checker", [True, False], ["perhaps", {}]),
    ("output_format", ["jpeg", "png"], ["gif", "JPEG", 1]),
    ("acceleration", ["none", "regular", "high"], ["max", None]),
    ("image_size", ["square_hd", "portrait_16_9", {"width": 16, "height": 16}, {"width": 1, "height": 1}],
     ["huge", {"width": 0, "height": 64}, {"width": 64, "height": 14143}, {"width": "wide"}, [512, 512], 512,
      {"width": 14142, "height": 14142}, {"width": 1536, "height": 1552}]),
    ("prompt", ["x"], ["", 5, None, ["a"]]),
]


@pytest.mark.parametrize("field, good, bad", T2I_CASES, ids=[c[0] for c in T2I_CASES])
def test_text_to_image_field_bounds(client, field, good, bad):
    for value in good:
        fields = _ok(**{field: value})
        if field == "num_images":
            fields["image_size"] = {"width": 32, "height": 32}
        if field == "image_size" and isinstance(value, str):
            fields["image_size"] = "square"  # presets are checked below without generating big images
        response = client.post(T2I, json=fields)
        assert response.status_code == 200, (field, value, response.text)
    for value in bad:
        _assert_422(client.post(T2I, json=_ok(**{field: value})), field)


def test_custom_size_rounding_and_presets(client):
    body = client.post(T2I, json=_ok(image_size={"width": 330, "height": 47})).json()
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (320, 32)
    body = client.post(T2I, json=_ok(image_size={"height": 100})).json()  # missing key = 512
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (512, 96)
    body = client.post(T2I, json=_ok(image_size="portrait_16_9")).json()
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (576, 1024)
    body = client.post(T2I, json=_ok(image_size={"width": 1536, "height": 1536}, num_inference_steps=1))
    assert body.status_code == 200  # exactly at the pixel cap


def test_missing_required_fields(client):
    _assert_422(client.post(T2I, json={"image_size": "square"}), "prompt")
    _assert_422(client.post(I2I, json={"prompt": "x"}), "image_url")
    _assert_422(client.post(I2I, json={"image_url": SOURCE}), "prompt")
    bad_json = client.post(T2I, content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422


I2I_CASES = [
    ("strength", [0.01, 1], [0.0, 1.01, "strong"]),
    ("num_inference_steps", [10, 50], [9, 51]),
    ("image_url", [SOURCE], ["ftp://example.com/a.png", "not a url", 7]),
]


@pytest.mark.parametrize("field, good, bad", I2I_CASES, ids=[c[0] for c in I2I_CASES])
def test_image_to_image_field_bounds(client, field, good, bad):
    base = {"prompt": "x", "image_url": SOURCE, "num_inference_steps": 10, "strength": 0.1, "sync_mode": True}
    for value in good:
        response = client.post(I2I, json=base | {field: value})
        assert response.status_code == 200, (field, value, response.text)
        assert response.json()["images"][0]["width"] == 32
    for value in bad:
        _assert_422(client.post(I2I, json=base | {field: value}), field)


def test_undecodable_image_is_a_clear_422(client):
    response = client.post(I2I, json={"prompt": "x", "image_url": "data:image/png;base64,aGVsbG8="})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("Could not load image from url")
