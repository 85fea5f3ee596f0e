"""The OpenAI images API through the official `openai` package, against a real Serve instance."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from server.images import data_uri
from tests.harness import DATA_PLANES, running_serve, tiny_env
from tests.pixels import assert_same_pixels, pixels

KEY = "openai-test-key"
SAMPLING = {"seed": 11, "num_inference_steps": 3, "guidance_scale": 3.5, "enable_safety_checker": False}


@pytest.fixture(scope="module", params=DATA_PLANES)
def server(request, tiny_root, tmp_path_factory):
    env = tiny_env(tiny_root, tmp_path_factory.mktemp("openai"))
    with running_serve(env, secrets={"SRPO_API_KEYS": json.dumps([KEY])}, data_plane=request.param) as base:
        yield base


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_generate_b64_and_url_give_the_fal_routes_pixels(client, server):
    b64 = client.images.generate(model="flux-srpo", prompt="a lighthouse", size="256x192", n=2,
                                 response_format="b64_json", output_format="png", extra_body=SAMPLING)
    assert len(b64.data) == 2 and b64.size == "256x192" and b64.output_format == "png"
    got = [_png(base64.b64decode(d.b64_json)) for d in b64.data]
    assert got[0].shape == (192, 256, 3)

    fal = httpx.post(f"{server}/fal-ai/flux/srpo", headers={"Authorization": f"Key {KEY}"}, timeout=120,
                     json={"prompt": "a lighthouse", "image_size": {"width": 256, "height": 192}, "num_images": 2,
                           "output_format": "png", "sync_mode": True, **SAMPLING}).json()
    with httpx.Client() as http:
        for mine, theirs in zip(got, fal["images"]):
            assert np.array_equal(mine, pixels(theirs["url"], http))  # same request, same pixels

    by_url = client.images.generate(prompt="a lighthouse", size="256x192", response_format="url",
                                    extra_body=SAMPLING)
    fetched = httpx.get(by_url.data[0].url)
    assert fetched.status_code == 200
    assert_same_pixels(_png(fetched.content), got[0])  # n=1 against a sample of an n=2 forward: rounding only


def test_edit_gives_the_fal_routes_pixels_for_the_resized_upload(client, server):
    photo = Image.fromarray((np.random.RandomState(0).rand(100, 150, 3) * 255).astype(np.uint8))
    source = io.BytesIO()
    photo.save(source, "PNG")
    source.seek(0)
    edited = client.images.edit(image=("source.png", source, "image/png"), prompt="as a watercolour",
                                size="128x96", response_format="b64_json",
                                extra_body={"strength": 0.5, "num_inference_steps": 10, "seed": 2})
    got = _png(base64.b64decode(edited.data[0].b64_json))
    assert got.shape == (96, 128, 3)

    resized = io.BytesIO()  # the README: an edit resizes the upload to `size` first
    photo.resize((128, 96), Image.Resampling.LANCZOS).save(resized, "PNG")
    fal = httpx.post(f"{server}/fal-ai/flux/srpo/image-to-image", headers={"Authorization": f"Key {KEY}"},
                     timeout=120, json={"prompt": "as a watercolour", "image_url": data_uri(resized.getvalue(),
                                                                                            "image/png"),
                                        "strength": 0.5, "num_inference_steps": 10, "seed": 2,
                                        "output_format": "png", "sync_mode": True})
    assert fal.status_code == 200, fal.text
    with httpx.Client() as http:
        assert np.array_equal(got, pixels(fal.json()["images"][0]["url"], http))

    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=("notes.txt", io.BytesIO(b"not an image"), "text/plain"), prompt="x")
    assert err.value.body["param"] == "image"


def test_errors_are_openais(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="1000x1000")  # not a multiple of 16
    assert "multiple of 16" in err.value.message and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="4096x4096")  # beyond the deployment's pixel cap
    assert "SRPO_MAX_PIXELS" in err.value.message
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="x", n=5)
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
    assert err.value.body["code"] == "invalid_api_key"


def test_models_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == ["flux-srpo"]
