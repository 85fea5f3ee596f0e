"""LoRAs through a real Serve instance (tiny model, two Denoiser replicas): every source a path may
name, pixels equal to the in-process pipeline (itself equal to diffusers, tests/test_loras.py),
requests with different LoRAs sharing forwards, placement on the replica that holds a LoRA, and
every kind of bad LoRA refused with a clear 4xx while other requests go on."""

from __future__ import annotations

import http.server
import json
import shutil
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest
import torch

from api.schemas import TextToImageInput
from models.pipeline import SRPOPipeline
from models.request import LoraRef
from server.service import to_generation_request
from tests import loras
from tests.conftest import CPU
from tests.harness import denoiser_stats, running_serve, tiny_env, wait_until
from tests.pixels import assert_same_pixels, pixels
from tests.certs import write_private_ca_and_server_cert
from tests.test_storage import BUCKET, s3  # noqa: F401  (moto's S3 server fixture)

T2I = "/fal-ai/flux/srpo"
HF_REVISION = "0123456789abcdef0123456789abcdef01234567"


def body(**fields) -> dict:
    return {"prompt": "a paper boat", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 3,
            "seed": 4, "guidance_scale": 3.5, "enable_safety_checker": False, "output_format": "png",
            "sync_mode": True} | fields


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora_dir")
    made = {
        "style": loras.diffusers_lora(folder / "style.safetensors", 11, text_encoder=True),
        "kohya": loras.kohya_lora(folder / "kohya.safetensors", 12),
        "xlabs": loras.xlabs_lora(folder / "xlabs.safetensors", 13),
        "a": loras.diffusers_lora(folder / "a.safetensors", 14),
        "b": loras.diffusers_lora(folder / "b.safetensors", 15, rank=8),
        "sdxl": loras.sdxl_lora(folder / "sdxl.safetensors", 16),
        "wrong_shape": loras.wrong_shape_lora(folder / "wrong_shape.safetensors", 17),
    }
    torch.save({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, folder / "pickled.safetensors")
    (folder / "huge.safetensors").write_bytes(b"\0" * 300_000)
    return made


@pytest.fixture(scope="module")
def https_root(tmp_path_factory, files):
    """A TLS file server on 127.0.0.1 with a certificate from a test CA (the replicas trust it through
    SSL_CERT_FILE, as an operator would configure a private CA)."""
    folder = tmp_path_factory.mktemp("https")
    ca, cert, key = write_private_ca_and_server_cert(tmp_path_factory.mktemp("tls"))
    shutil.copy(files["kohya"], folder / "kohya.safetensors")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/kohya.safetensors")
                self.end_headers()
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", ca
    server.shutdown()


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, files) -> Path:
    """A Hugging Face cache folder as huggingface_hub leaves it, used offline."""
    cache = tmp_path_factory.mktemp("hf")
    repo = cache / "models--acme--paper-style"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HF_REVISION)
    (repo / "snapshots" / HF_REVISION).mkdir(parents=True)
    shutil.copy(files["xlabs"], repo / "snapshots" / HF_REVISION / "paper.safetensors")
    return cache


@pytest.fixture(scope="module")
def server(tiny_root, tmp_path_factory, files, https_root, hf_cache, s3):  # noqa: F811
    _, ca = https_root
    boto3.client("s3", endpoint_url=s3["endpoint_url"], aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").upload_file(str(files["style"]), BUCKET, "loras/style.safetensors")
    env = tiny_env(
        tiny_root, tmp_path_factory.mktemp("state"),
        SRPO_LORA_DIR=str(files["style"].parent),
        SRPO_LORA_CACHE_DIR=str(tmp_path_factory.mktemp("lora_cache")),
        SRPO_LORA_URL_ALLOWED_NETWORKS=json.dumps(["127.0.0.1/32"]),
        SRPO_LORA_MAX_FILE_BYTES="200000",
        SRPO_LORA_DEVICE_SLOTS="1",  # one set per replica: placement decides whether requests reload
        SRPO_STORAGE_OPTIONS=json.dumps(s3),
        SSL_CERT_FILE=str(ca),
        HF_HUB_CACHE=str(hf_cache),
        HF_HUB_OFFLINE="1",
    )
    with running_serve(env, {"deployment_options": {"Denoiser": {"num_replicas": 2}}}) as base:
        yield base


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return SRPOPipeline(tiny_model_dir, None, CPU, torch.float32)


def expected(reference: SRPOPipeline, fields: dict, chosen: list[tuple[Path, float]]):
    request = to_generation_request(TextToImageInput(**body(**fields)), fields.get("seed", 4))
    refs = tuple(LoraRef(str(f), str(f), f.name, s) for f, s in chosen)
    return reference.generate(request.__class__(**{**request.__dict__, "loras": refs}), False).images[0]


def test_every_source_serves_the_reference_pixels(server, reference, files, https_root):
    url, _ = https_root
    cases = [
        ({"path": "style", "scale": 0.9}, files["style"]),  # a name in SRPO_LORA_DIR, with a CLIP part
        ({"path": f"{url}/redirect"}, files["kohya"]),  # https, through a redirect
        ({"path": f"s3://{BUCKET}/loras/style.safetensors", "scale": 0.9}, files["style"]),
        ({"path": "acme/paper-style"}, files["xlabs"]),  # a Hugging Face repo id, from the offline cache
    ]
    with httpx.Client(base_url=server, timeout=120) as client:
        for lora, file in cases:
            response = client.post(T2I, json=body(loras=[lora]))
            assert response.status_code == 200, (lora, response.text)
            want = expected(reference, {}, [(file, lora.get("scale", 1.0))])
            assert_same_pixels(pixels(response.json()["images"][0]["url"], client), want)


def test_three_loras_through_the_queue_with_fal_client(server, reference, files, monkeypatch):
    import fal_client

    monkeypatch.setenv("FAL_KEY", "unused")  # the server has no keys configured
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{server}/")
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{server}/queue/")
    chosen = [("style", 0.7), ("kohya", 1.1), ("xlabs", -0.5)]
    logs = []
    result = fal_client.subscribe(
        "fal-ai/flux/srpo", arguments=body(loras=[{"path": n, "scale": s} for n, s in chosen], sync_mode=False),
        with_logs=True, on_queue_update=lambda update: logs.extend(getattr(update, "logs", None) or []))
    with httpx.Client(base_url=server, timeout=60) as http:
        got = pixels(result["images"][0]["url"], http)
    assert_same_pixels(got, expected(reference, {}, [(files[n], s) for n, s in chosen]))
    assert any("Loading 3 LoRA(s)" in entry["message"] for entry in logs), logs


def test_concurrent_requests_with_different_loras_each_equal_their_alone_run(server, reference, files):
    """Six at once over two replicas with one device slot each: requests wait for a slot, none sees
    another's adapter. (That different adapters share one forward is shown on the engine, where the
    batch is chosen: tests/test_loras.py.)"""
    sets = [[], [("a", 1.0)], [("b", 0.5)], [("a", 0.4), ("kohya", 1.0)], [], [("xlabs", 1.3)]]
    with httpx.Client(base_url=server, timeout=120) as client, ThreadPoolExecutor(6) as pool:
        bodies = [body(seed=i, num_inference_steps=8, image_size={"width": 128, "height": 128},
                       loras=[{"path": n, "scale": s} for n, s in chosen]) for i, chosen in enumerate(sets)]
        responses = list(pool.map(lambda b: client.post(T2I, json=b), bodies))
        for b, chosen, response in zip(bodies, sets, responses):
            assert response.status_code == 200, response.text
            want = expected(reference, {k: b[k] for k in ("seed", "num_inference_steps", "image_size")},
                            [(files[n], s) for n, s in chosen])
            assert_same_pixels(pixels(response.json()["images"][0]["url"], client), want)


def test_alternating_loras_stay_where_they_are_resident(server, files):
    """Two replicas with one device slot each: 20 requests alternating two LoRAs load each LoRA at
    most once per replica (the router sends each to the replica holding it)."""
    before = denoiser_stats(2)
    with httpx.Client(base_url=server, timeout=120) as client:
        for i in range(20):
            name = "a" if i % 2 == 0 else "b"
            response = client.post(T2I, json=body(seed=i, num_inference_steps=2, loras=[{"path": name}]))
            assert response.status_code == 200, response.text
    after = denoiser_stats(2)

    def delta(key: str, event: str) -> int:
        return after[key]["loras"]["events"].get(event, 0) - before[key]["loras"]["events"].get(event, 0)

    misses = {key: delta(key, "device_miss") for key in after}
    hits = sum(delta(key, "device_hit") for key in after)
    assert all(m <= 2 for m in misses.values()), misses  # each of the two LoRAs at most once per replica
    assert hits >= 16, (hits, misses)  # most requests ran where their LoRA was resident


@pytest.mark.parametrize("lora, status, message", [
    ({"path": "../state/queue/requests.sqlite3"}, 422, "outside the LoRA folder"),
    ({"path": "pickled"}, 422, "pickle"),
    ({"path": "huge"}, 422, "SRPO_LORA_MAX_FILE_BYTES"),
    ({"path": "sdxl"}, 422, "no FLUX layout"),
    ({"path": "wrong_shape"}, 422, "do not fit this model"),
    ({"path": "http://169.254.169.254/latest/lora.safetensors"}, 422, "non-public address"),
    ({"path": "missing/nothing-here"}, 422, "Hugging Face"),
    ({"path": "style", "scale": 9}, 422, "SRPO_LORA_MAX_ABS_SCALE"),
])
def test_bad_loras_are_clear_4xx_and_hurt_nobody(server, lora, status, message):
    with httpx.Client(base_url=server, timeout=120) as client, ThreadPoolExecutor(2) as pool:
        good = pool.submit(client.post, T2I, json=body(num_inference_steps=12, image_size={"width": 256, "height": 256},
                                                         loras=[{"path": "a"}]))
        bad = client.post(T2I, json=body(loras=[lora]))
        assert bad.status_code == status, bad.text
        assert message in json.dumps(bad.json()), bad.json()
        assert bad.headers.get("x-fal-error-type") == "input_error"
        assert good.result().status_code == 200, good.result().text
        assert client.get("/health").status_code == 200


def test_nan_scale_and_too_many_loras_are_refused(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        nan = client.post(T2I, content=json.dumps(body(loras=[{"path": "style", "scale": float("nan")}])),
                          headers={"content-type": "application/json"})
        assert nan.status_code == 422, nan.text
        many = client.post(T2I, json=body(loras=[{"path": "style"}] * 5))
        assert many.status_code == 422 and "SRPO_LORA_MAX_PER_REQUEST" in many.text, many.text
        wait_until(lambda: client.get("/health").status_code == 200, 30, "healthy after refusals")
