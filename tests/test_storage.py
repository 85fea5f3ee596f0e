"""Outputs and queue payloads on storage: a real S3-compatible server (moto's, on 127.0.0.1) and
the local folder, through the real HTTP app and a real Serve instance."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlparse

import boto3
import fsspec
import httpx
import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models.pipeline import SRPOPipeline
from server.app import build_app
from server.queue.payloads import Payloads
from server.queue.store import RedisRequestStore, SqliteRequestStore
from server.service import InProcessBackend, SRPOService
from server.storage import OUTPUT_NAME, ObjectStore
from settings import Settings, get_settings
from tests.conftest import CPU
from tests.harness import free_port, running_serve, tiny_env

T2I, I2I = "fal-ai/flux/srpo", "fal-ai/flux/srpo/image-to-image"
REQUESTS = "/queue/fal-ai/flux/requests"
BUCKET = "srpo-test"
LIFECYCLE = "x-fal-object-lifecycle-preference"


def _png(width: int = 32, height: int = 32, padding: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue() + b"\0" * padding  # decoders stop at IEND: padding makes a large, valid upload


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def small(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a red fox", "image_size": {"width": 64, "height": 48}, "num_inference_steps": 2,
            "seed": 3} | fields


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    """moto's standalone S3 server on 127.0.0.1 with one bucket; yields fsspec options for it."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
                   "client_kwargs": {"region_name": "us-east-1"}}
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        # Anyone may read under public/, as a bucket behind a CDN would allow (README: "Storage").
        client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/public/*"}
        ]}))
        yield options
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tiny_safety_dir) -> SRPOPipeline:
    return SRPOPipeline(tiny_model_dir, tiny_safety_dir, CPU, torch.float32)


def _settings(tmp_path: Path, **update: Any) -> Settings:
    return get_settings().model_copy(update={"storage_dir": tmp_path / "files",
                                             "queue_db_path": tmp_path / "requests.sqlite3", **update})


def _app(pipeline: SRPOPipeline, settings: Settings, store=None) -> TestClient:
    return TestClient(build_app(SRPOService(InProcessBackend(pipeline), settings), store=store))


def _queued(client, endpoint: str, body: dict, timeout_s: float = 60, **kwargs) -> tuple[dict, httpx.Response]:
    submitted = client.post(f"/queue/{endpoint}", json=body, **kwargs)
    assert submitted.status_code == 200, submitted.text
    request_id = submitted.json()["request_id"]
    deadline = time.monotonic() + timeout_s
    while (status := client.get(f"{REQUESTS}/{request_id}/status").json())["status"] != "COMPLETED":
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status, client.get(f"{REQUESTS}/{request_id}")


def _object_key(s3_root: str, url_or_name: str) -> str:
    name = url_or_name.split("?")[0].rsplit("/", 1)[-1]
    assert OUTPUT_NAME.match(name), name
    return f"{s3_root}/files/{name}"


def test_sync_and_queued_outputs_on_s3_behind_presigned_urls(pipeline, s3, tmp_path):
    fs = fsspec.filesystem("s3", **s3)
    root = f"{BUCKET}/presigned"
    settings = _settings(tmp_path, storage_url=f"s3://{root}", storage_options=s3)
    with _app(pipeline, settings) as client:
        sync = client.post(f"/{T2I}", json=small(num_images=2))
        i2i = client.post(f"/{I2I}", json={"prompt": "x", "image_url": _data_uri(_png()), "num_inference_steps": 10,
                                           "strength": 0.2})
        _, queued = _queued(client, T2I, small(seed=5))
        for response in (sync, i2i, queued):
            assert response.status_code == 200, response.text
            for image in response.json()["images"]:
                url = image["url"]
                query = parse_qs(urlparse(url).query)
                assert url.startswith(s3["endpoint_url"]) and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"], url
                assert "X-Amz-Signature" in query and "Signature" not in query  # SigV4, not SigV2
                fetched = httpx.get(url)
                assert fetched.status_code == 200
                stored = fs.cat_file(_object_key(root, url))
                assert fetched.content == stored and len(stored) == image["file_size"]
                assert Image.open(io.BytesIO(stored)).size == (image["width"], image["height"])
                # /files/<name> keeps working: the app reads the object for the client
                assert client.get(f"/files/{image['file_name']}").content == stored
        assert httpx.get(sync.json()["images"][0]["url"].split("?")[0]).status_code == 403  # unsigned: refused


def test_public_base_urls_and_per_request_expiry(pipeline, s3, tmp_path):
    fs = fsspec.filesystem("s3", **s3)
    root = f"{BUCKET}/public"
    base = f"{s3['endpoint_url']}/{root}"  # stands in for a CDN in front of the bucket
    settings = _settings(tmp_path, storage_url=f"s3://{root}", storage_options=s3, storage_public_base_url=base)
    with _app(pipeline, settings) as client:
        kept = client.post(f"/{T2I}", json=small()).json()["images"][0]
        short = client.post(f"/{T2I}", json=small(seed=4), headers={LIFECYCLE: '{"expiration_duration_seconds": 1}'})
        short = short.json()["images"][0]
        _, queued = _queued(client, T2I, small(seed=6), headers={LIFECYCLE: '{"expiration_duration_seconds": 2}'})
        queued = queued.json()["images"][0]
        for image in (kept, short, queued):
            assert image["url"] == f"{base}/files/{image['file_name']}"
            assert httpx.get(image["url"]).content == fs.cat_file(_object_key(root, image["url"]))
        expiry = {k: int(OUTPUT_NAME.match(i["file_name"])["expires"]) - time.time()
                  for k, i in [("kept", kept), ("short", short), ("queued", queued)]}
        assert expiry["kept"] > 6 * 24 * 3600 and expiry["short"] <= 1 and expiry["queued"] <= 2, expiry

        bad = client.post(f"/{T2I}", json=small(), headers={LIFECYCLE: '{"expiration_duration_seconds": 0}'})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", LIFECYCLE], bad.text

        store = ObjectStore(f"s3://{root}", s3)
        deadline = time.monotonic() + 10
        while fs.exists(_object_key(root, short["url"])) or fs.exists(_object_key(root, queued["url"])):
            assert time.monotonic() < deadline, "expired outputs were never swept"
            store.sweep_outputs()
            fs.invalidate_cache()
            time.sleep(0.2)
        assert fs.exists(_object_key(root, kept["url"]))
        assert client.get(f"/files/{short['file_name']}").status_code == 404
        assert client.get(f"/files/{kept['file_name']}").status_code == 200


def test_a_failed_upload_is_a_clean_error_not_a_dead_url(pipeline, s3, tmp_path):
    settings = _settings(tmp_path, storage_url="s3://no-such-bucket/outputs", storage_options=s3)
    with _app(pipeline, settings) as client:
        sync = client.post(f"/{T2I}", json=small())
        assert sync.status_code == 503, sync.text
        assert sync.json()["detail"].startswith("Could not store the output image")
        status, result = _queued(client, T2I, small())
        assert status["error_type"] == "storage_error" and result.status_code == 503, (status, result.text)
        ok = client.post(f"/{T2I}", json=small(sync_mode=True))  # data URIs need no storage
        assert ok.status_code == 200 and ok.json()["images"][0]["url"].startswith("data:image/jpeg;base64,")


def test_local_sweeper_removes_expired_outputs_and_keeps_the_disk_cap(tmp_path, caplog, monkeypatch):
    store = ObjectStore(str(tmp_path), max_bytes=2500)
    names = [store.save_output(bytes(1000), "png", ttl_s=3600) for _ in range(4)]
    expired = store.save_output(bytes(1000), "png", ttl_s=-1)
    for age, name in enumerate(reversed(names)):  # names[0] is the oldest file
        path = tmp_path / "files" / name
        os.utime(path, (time.time() - 100 * (age + 1),) * 2)
    assert store.local_path(expired) is None and store.read_output(expired) is None  # never served once expired
    # Another test's logging.config (uvicorn's, Ray's) may have disabled loggers that existed then.
    monkeypatch.setattr(logging.getLogger("server.storage"), "disabled", False)
    with caplog.at_level("WARNING", logger="server.storage"):
        report = store.sweep_outputs()
    assert (report.expired, report.evicted, report.evicted_bytes) == (1, 2, 2000)
    left = sorted(p.name for p in (tmp_path / "files").iterdir())
    assert left == sorted(names[2:]), left  # the two oldest went first
    assert "SRPO_STORAGE_MAX_BYTES" in caplog.text
    assert store.sweep_outputs() == type(report)()  # under the cap: nothing more goes


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_20_mb_input_stays_out_of_the_queue_record(pipeline, tmp_path, backend, request):
    settings = _settings(tmp_path, result_ttl_s=1.0)
    if backend == "sqlite":
        store = SqliteRequestStore(settings.queue_db_path, settings.result_ttl_s)
        db = sqlite3.connect(settings.queue_db_path)

        def record_bytes(request_id: str) -> int:
            row = db.execute("SELECT length(request) + coalesce(length(completion), 0) FROM requests WHERE id=?",
                             (request_id,)).fetchone()
            return row[0] if row else 0
    else:
        url = request.getfixturevalue("redis_url")
        store = RedisRequestStore(url, settings.result_ttl_s)
        db = redis.Redis.from_url(url)

        def record_bytes(request_id: str) -> int:
            key = f"{RedisRequestStore.PREFIX}r:{request_id}"
            return sum(db.hstrlen(key, field) for field in db.hkeys(key))

    uri = _data_uri(_png(padding=15 * 1024 * 1024))
    assert len(uri) > 20 * 1024 * 1024
    body = {"prompt": "x", "image_url": uri, "num_inference_steps": 10, "strength": 0.2}
    with _app(pipeline, settings, store=store) as client:
        status, result = _queued(client, I2I, body)
        assert result.status_code == 200 and result.json()["images"][0]["width"] == 32, result.text
        request_id = status["request_id"]
        assert 0 < record_bytes(request_id) < 4096, record_bytes(request_id)
        payloads = list((tmp_path / "files" / "payloads").iterdir())
        assert [p.name for p in payloads if request_id in p.name], payloads
        assert max(p.stat().st_size for p in payloads) > 20 * 1024 * 1024

        deadline = time.monotonic() + 10
        while client.get(f"{REQUESTS}/{request_id}/status").status_code != 404:  # the record expires
            assert time.monotonic() < deadline
            time.sleep(0.1)
        sweeper = Payloads(SRPOService(InProcessBackend(pipeline), settings).storage, 4096, grace_s=0)
        assert client.portal.call(sweeper.sweep, store) >= 1
        assert not [p for p in (tmp_path / "files" / "payloads").iterdir() if request_id in p.name]


def test_serve_graph_writes_outputs_to_s3(tiny_root, s3, tmp_path):
    """The real Serve graph, storage on S3: both endpoints and the queue hand out working URLs."""
    fs = fsspec.filesystem("s3", **s3)
    root = f"{BUCKET}/serve"
    env = tiny_env(tiny_root, tmp_path, SRPO_STORAGE_URL=f"s3://{root}", SRPO_STORAGE_OPTIONS=json.dumps(s3))
    with running_serve(env) as base, httpx.Client(base_url=base, timeout=120) as client:
        responses = [client.post(f"/{T2I}", json=small()),
                     client.post(f"/{I2I}", json={"prompt": "x", "image_url": _data_uri(_png()),
                                                  "num_inference_steps": 10, "strength": 0.2})]
        _, queued = _queued(client, T2I, small(seed=8))
        for response in [*responses, queued]:
            assert response.status_code == 200, response.text
            url = response.json()["images"][0]["url"]
            assert httpx.get(url).content == fs.cat_file(_object_key(root, url))
