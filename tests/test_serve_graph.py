"""End to end through a real Ray Serve instance on the tiny model: both endpoints, batching, handles."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from ray import serve

from api.schemas import ImageToImageInput, TextToImageInput
from deployments.ingress import GraphHealth
from models.pipeline import SRPOPipeline
from safety.tiny import write_tiny_safety_checker
from server.app import build_app
from server.images import encode_image
from server.service import InProcessBackend, SRPOService, to_generation_request
from settings import get_settings
from tests.conftest import CPU
from tests.harness import APP_NAME, running_serve, tiny_env
from tests.pixels import assert_same_pixels, pixels

T2I = "/fal-ai/flux/srpo"
I2I = "/fal-ai/flux/srpo/image-to-image"
FLAGGED = {"prompt": "the one the checker flags", "seed": 777, "image_size": {"width": 256, "height": 256},
           "num_inference_steps": 2}


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return SRPOPipeline(tiny_model_dir, None, CPU, torch.float32)


@pytest.fixture(scope="module")
def source_server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 with one PNG and one text file."""
    root = tmp_path_factory.mktemp("www")
    noise = (np.random.RandomState(3).rand(150, 200, 3) * 255).astype(np.uint8)
    Image.fromarray(noise).save(root / "source.png")
    (root / "notes.txt").write_text("not an image")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


@pytest.fixture(scope="module")
def server(tiny_root, reference, tmp_path_factory):
    flag_body = TextToImageInput(**FLAGGED)
    flagged = reference.generate(to_generation_request(flag_body, FLAGGED["seed"]), False).images[0]
    safety = write_tiny_safety_checker(tmp_path_factory.mktemp("safety"), flagged=flagged, threshold=0.999)
    env = tiny_env(tiny_root, tmp_path_factory.mktemp("files"), SRPO_SAFETY_DIR=str(safety),
                   SRPO_IMAGE_URL_ALLOWED_NETWORKS='["127.0.0.1/32"]')
    with running_serve(env, {"text_batch_wait_s": 0.05, "decode_batch_wait_s": 0.05}) as base:
        yield base


def _expected(reference, body: dict, source: Image.Image | None = None) -> list[np.ndarray]:
    model = ImageToImageInput(**body) if "image_url" in body else TextToImageInput(**body)
    return reference.generate(to_generation_request(model, body["seed"], source), False).images


@pytest.mark.parametrize("num_images, fmt", [(1, "png"), (2, "jpeg"), (4, "png")])
def test_text_to_image_equals_in_process_pixels(server, reference, num_images, fmt):
    body = {"prompt": "a harbour at night", "seed": 1000 + num_images, "num_images": num_images,
            "image_size": {"width": 330, "height": 200}, "num_inference_steps": 3, "output_format": fmt,
            "enable_safety_checker": False}
    with httpx.Client(timeout=120) as client:
        response = client.post(server + T2I, json=body)
        assert response.status_code == 200, response.text
        assert response.headers["x-fal-request-id"]
        out = response.json()
        assert out["seed"] == body["seed"] and out["prompt"] == body["prompt"]
        assert out["has_nsfw_concepts"] == [False] * num_images
        assert len(out["images"]) == num_images
        expected = _expected(reference, body)
        for image, want in zip(out["images"], expected):
            assert (image["width"], image["height"]) == (320, 192)
            assert image["content_type"] == f"image/{fmt}" and image["file_name"].endswith(fmt)
            assert image["url"].startswith(server + "/files/")
            served = client.get(image["url"])
            assert served.headers["content-type"] == f"image/{fmt}"
            assert int(served.headers["content-length"]) == image["file_size"]
            if fmt == "jpeg":  # lossy: compare with the same encoding of the expected pixels
                want = np.asarray(Image.open(io.BytesIO(encode_image(want, "jpeg"))))
            assert_same_pixels(pixels(image["url"], client), want, max_diff=2 if fmt == "png" else 16)
        again = client.post(server + T2I, json=body | {"sync_mode": True}).json()
        for first, second in zip(out["images"], again["images"]):
            assert second["url"].startswith(f"data:image/{fmt};base64,")
            assert np.array_equal(pixels(first["url"], client), pixels(second["url"], client))


def test_random_seed_is_reported_and_reproduces(server):
    body = {"prompt": "a random seed", "image_size": "square", "num_inference_steps": 1, "sync_mode": True,
            "output_format": "png"}
    with httpx.Client(timeout=120) as client:
        first = client.post(server + T2I, json=body).json()
        assert 0 <= first["seed"] < 2**53
        replay = client.post(server + T2I, json=body | {"seed": first["seed"]}).json()
        assert np.array_equal(pixels(first["images"][0]["url"], client), pixels(replay["images"][0]["url"], client))


def test_safety_checker_blacks_out_flagged_image_only_when_enabled(server):
    with httpx.Client(timeout=120) as client:
        on = client.post(server + T2I, json=FLAGGED | {"output_format": "png", "num_images": 1})
        assert on.status_code == 200
        assert on.json()["has_nsfw_concepts"] == [True]
        assert not pixels(on.json()["images"][0]["url"], client).any()
        off = client.post(server + T2I, json=FLAGGED | {"output_format": "png", "enable_safety_checker": False})
        assert off.json()["has_nsfw_concepts"] == [False]
        assert pixels(off.json()["images"][0]["url"], client).any()
        other = client.post(server + T2I, json=FLAGGED | {"seed": 778, "output_format": "png"})
        assert other.json()["has_nsfw_concepts"] == [False]


def test_image_to_image_from_data_uri_and_local_http(server, reference, source_server):
    base_url, root = source_server
    source = Image.open(root / "source.png").convert("RGB")
    data_uri = "data:image/png;base64," + base64.b64encode((root / "source.png").read_bytes()).decode()
    with httpx.Client(timeout=120) as client:
        for url in (data_uri, f"{base_url}/source.png"):
            body = {"prompt": "make it blue", "image_url": url, "strength": 0.6, "num_inference_steps": 10,
                    "seed": 31, "output_format": "png", "enable_safety_checker": False, "num_images": 2}
            response = client.post(server + I2I, json=body)
            assert response.status_code == 200, response.text
            images = response.json()["images"]
            assert (images[0]["width"], images[0]["height"]) == (192, 144)
            for image, want in zip(images, _expected(reference, body, source)):
                assert_same_pixels(pixels(image["url"], client), want)


def test_bad_inputs_and_urls_are_clear_422s(server, source_server):
    base_url, _ = source_server
    closed = f"http://127.0.0.1:{_closed_port()}/x.png"
    cases = {
        f"{base_url}/notes.txt": "not a readable image",
        f"{base_url}/missing.png": "HTTP 404",
        closed: "connection failed",
        "http://10.1.2.3/secret.png": "non-public address",
        "http://169.254.169.254/latest/meta-data": "non-public address",
        "data:image/png;base64,bm90IGFuIGltYWdl": "not a readable image",
    }
    with httpx.Client(timeout=120) as client:
        for url, reason in cases.items():
            response = client.post(server + I2I, json={"prompt": "x", "image_url": url})
            assert response.status_code == 422, url
            assert response.headers["content-type"] == "application/json"
            detail = response.json()["detail"]
            assert detail.startswith("Could not load image from url") and reason in detail, detail
        bad = client.post(server + T2I, json={"prompt": "x", "num_images": 9})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "num_images"]
        # The server is unharmed: a good request still works.
        assert client.post(server + T2I, json={"prompt": "x", "num_inference_steps": 1, "image_size": "square",
                                               "sync_mode": True}).status_code == 200


def _closed_port() -> int:
    from tests.harness import free_port

    return free_port()


def test_sixteen_concurrent_mixed_requests_are_all_correct_and_batched(server, reference):
    sizes = [{"width": 256, "height": 256}, {"width": 320, "height": 192}, {"width": 192, "height": 320}]
    # One image per request: a forward of several samples can only come from requests sharing it. Enough
    # steps that requests overlap in the Denoiser however the stages before it space them out (with 2-4
    # steps one full run saw every request denoised alone).
    bodies = [{"prompt": f"scene number {i}", "seed": 2000 + i, "image_size": sizes[i % 3],
               "num_inference_steps": 8 + i % 3, "num_images": 1, "output_format": "png",
               "sync_mode": True, "enable_safety_checker": False} for i in range(16)]
    before = _batch_sizes()
    with httpx.Client(timeout=300) as client, ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda b: client.post(server + T2I, json=b), bodies))
        for body, response in zip(bodies, responses):
            assert response.status_code == 200, response.text
            images = response.json()["images"]
            for image, want in zip(images, _expected(reference, body)):
                assert_same_pixels(pixels(image["url"], client), want)
    after = _batch_sizes()
    for name in after:  # batches of this test's requests only (the stats count since the replica started)
        shared = {int(size): n - before[name].get(size, 0) for size, n in after[name].items()}
        assert any(size > 1 and n > 0 for size, n in shared.items()), (name, before[name], after[name])


def _batch_sizes() -> dict[str, dict]:
    return {name: dict(serve.get_deployment_handle(name, APP_NAME).stats.remote().result()["batch_sizes"])
            for name in ("TextEncoder", "Denoiser", "Decoder")}


def test_health_and_openapi(server):
    health = httpx.get(server + "/health").json()
    assert health == {"status": "ok", "stages": {"Ingress": True, "TextEncoder": True, "Denoiser": True, "Decoder": True}}
    spec = httpx.get(server + "/openapi.json").json()
    assert {T2I, I2I} <= set(spec["paths"])
    assert httpx.get(server + "/files/../../etc/passwd").status_code == 404
    assert httpx.get(server + "/files/" + "0" * 32 + ".png").status_code == 404


def test_health_is_503_while_serve_does_not_list_the_application(server, reference, tmp_path):
    """Readiness read from Serve's real status: an application it does not list (being deployed or
    deleted) is not ready, and neither is one whose stages are listed but not all serving."""
    settings = get_settings().model_copy(update={"storage_dir": tmp_path / "files",
                                                 "queue_db_path": tmp_path / "requests.sqlite3"})
    service = SRPOService(InProcessBackend(reference), settings)
    with TestClient(build_app(service, GraphHealth("not-deployed"))) as client:
        response = client.get("/health")
        assert (response.status_code, response.json()) == (503, {"status": "starting", "stages": {}})
    with TestClient(build_app(service, GraphHealth(APP_NAME))) as client:
        assert client.get("/health").status_code == 200  # the same check on the running application


@serve.deployment
class HandleCaller:
    """A deployment of another application that calls the SRPO app through its handle."""

    async def __call__(self, request) -> dict:
        body = TextToImageInput(**(await request.json()))
        output = await serve.get_app_handle(APP_NAME).generate.remote(body)
        return output.model_dump()


def test_handle_call_from_a_second_application(server):
    serve.run(HandleCaller.bind(), name="caller", route_prefix="/caller")
    body = {"prompt": "through a handle", "seed": 4242, "image_size": "square", "num_inference_steps": 2,
            "sync_mode": True, "output_format": "png", "num_images": 2}
    with httpx.Client(timeout=120) as client:
        via_handle = client.post(server + "/caller", json=body).json()
        via_http = client.post(server + T2I, json=body).json()
        assert via_handle["seed"] == via_http["seed"] and via_handle["prompt"] == via_http["prompt"]
        assert via_handle["has_nsfw_concepts"] == via_http["has_nsfw_concepts"]
        for a, b in zip(via_handle["images"], via_http["images"], strict=True):
            assert np.array_equal(pixels(a["url"], client), pixels(b["url"], client))
    serve.delete("caller")
