"""Bad input is a clear 4xx before any work, never a 5xx; outbound fetches reach only checked addresses.

Through the real HTTP app (the in-process pipeline behind it) and real HTTP servers on 127.0.0.x.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import numpy as np
import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode

from models.pipeline import SRPOPipeline
from server.app import build_app
from server.image_fetch import fetch_image_bytes
from server.images import ImageLoadError
from server.outbound import refused
from server.service import InProcessBackend, SRPOService
from settings import get_settings
from tests.conftest import CPU
from tests.harness import free_port

T2I, I2I = "/fal-ai/flux/srpo", "/fal-ai/flux/srpo/image-to-image"
ROUTES = [T2I, I2I, f"/queue{T2I}", f"/queue{I2I}"]
SMALL = {"prompt": "x", "image_size": {"width": 32, "height": 32}, "num_inference_steps": 1, "sync_mode": True}


def _app(tiny_model_dir, tiny_safety_dir, state):
    pipeline = SRPOPipeline(tiny_model_dir, tiny_safety_dir, CPU, torch.float32)
    # A small pixel cap keeps the valid bodies the fuzzer finds quick to generate on a CPU.
    settings = get_settings().model_copy(update={"storage_dir": state / "files", "max_pixels": 64 * 64,
                                                 "queue_db_path": state / "requests.sqlite3",
                                                 "max_body_bytes": 64 * 1024,
                                                 "image_max_source_pixels": 128 * 128})
    return build_app(SRPOService(InProcessBackend(pipeline), settings))


@pytest.fixture(scope="module")
def client(tiny_model_dir, tiny_safety_dir, tmp_path_factory) -> Iterator[TestClient]:
    with TestClient(_app(tiny_model_dir, tiny_safety_dir, tmp_path_factory.mktemp("bounded"))) as client:
        yield client


def _assert_contract_error(response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json" and response.headers["x-fal-request-id"]
    body = response.json()
    assert body["detail"] and body["error_type"] == response.headers["x-fal-error-type"]


@pytest.mark.parametrize("route", ROUTES)
def test_oversized_bodies_are_413_before_they_are_read(client, route):
    big = SMALL | {"prompt": "x" * 100_000}
    _assert_contract_error(client.post(route, json=big), 413)  # declared Content-Length

    def chunked() -> Iterator[bytes]:
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    _assert_contract_error(client.post(route, content=chunked(), headers={"content-type": "application/json"}),
                           413)
    assert client.post(T2I, json=SMALL).status_code == 200  # the server is unharmed


def test_a_20_mb_prompt_and_non_numbers_are_4xx_within_a_second(tiny_model_dir, tiny_safety_dir, tmp_path):
    pipeline = SRPOPipeline(tiny_model_dir, tiny_safety_dir, CPU, torch.float32)
    settings = get_settings().model_copy(update={"storage_dir": tmp_path / "files",  # the default body cap
                                                 "queue_db_path": tmp_path / "requests.sqlite3"})
    with TestClient(build_app(SRPOService(InProcessBackend(pipeline), settings))) as client:
        for route in (T2I, f"/queue{T2I}"):
            began = time.monotonic()
            response = client.post(route, json=SMALL | {"prompt": "x" * (20 * 1024 * 1024)})
            assert time.monotonic() - began < 1.0
            _assert_contract_error(response, 422)
            assert len(response.content) < 4096  # the prompt is not echoed back whole
            assert response.json()["detail"][0]["loc"] == ["body", "prompt"]
        for value in ("NaN", "Infinity", "-Infinity"):
            raw = json.dumps(SMALL).replace('"num_inference_steps": 1', f'"guidance_scale": {value}').encode()
            response = client.post(T2I, content=raw, headers={"content-type": "application/json"})
            _assert_contract_error(response, 422)
            raw = json.dumps({"prompt": "x", "image_url": "data:,", "strength": 0.5}).replace("0.5", value).encode()
            response = client.post(I2I, content=raw, headers={"content-type": "application/json"})
            _assert_contract_error(response, 422)
            assert response.json()["detail"][0]["loc"] == ["body", "strength"]


def test_300_bodies_from_the_openapi_schema_never_get_a_5xx(tiny_model_dir, tiny_safety_dir, tmp_path):
    # An app of its own: schemathesis calls it from event loops of its own, and an app (its in-process
    # backend, its queue worker) lives on one loop, as in a server; shared with the module's TestClient,
    # whose loop ran the queue, a sync call could meet the backend's lock held from the other loop.
    app = _app(tiny_model_dir, tiny_safety_dir, tmp_path)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [schema[route]["POST"] for route in ROUTES]
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                       for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    seen: list[int] = []

    @settings(max_examples=300, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def check(case) -> None:
        # The generated queue submits run in the same in-process engine: a sync call can wait behind
        # them on 2 cores for longer than schemathesis' 10 s default.
        response = case.call(timeout=120)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.path, case.body, response.text)
        if response.status_code >= 400:
            body = response.json()
            (header,) = response.headers["x-fal-error-type"]  # schemathesis lists each header's values
            assert body["detail"] and body["error_type"] == header, body

    check()
    assert len(seen) == 300 and {s for s in seen if s < 300} and {s for s in seen if s >= 400}, sorted(set(seen))


# --------------------------------------------------------------------------- outbound (SSRF)

REFUSED = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
           "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254",
           "ff02::1", "64:ff9b::808:808", "64:ff9b:1::1", "2002:808:808::1", "2001:0:4136:e378::1",
           "::ffff:8.8.8.8", "::ffff:127.0.0.1", "::8.8.8.8", "100.100.100.200"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001::1"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address):
    assert refused(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_reached(address):
    assert not refused(ipaddress.ip_address(address))


class _Recorder(BaseHTTPRequestHandler):
    """Serves a PNG at /img.png, redirects /hop to the server's `location`, sends 5000 bytes at /big (with
    their length) and /big-unsized (without: the end is the connection's), answers /stall only once the
    server's `release` is set; records every hit."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.hits.append((self.path, self.headers["Host"]))
        if self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", self.server.location)
            self.end_headers()
            return
        if self.path == "/stall":
            self.server.release.wait(10)
            return
        if self.path.startswith("/big"):
            self.send_response(200)
            if self.path == "/big":
                self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(b"x" * 5000)
            return
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
        self.send_response(200)
        self.send_header("Content-Length", str(len(buf.getvalue())))
        self.end_headers()
        self.wfile.write(buf.getvalue())

    def log_message(self, *_) -> None:
        return None


@pytest.fixture
def servers() -> Iterator[dict[str, ThreadingHTTPServer]]:
    """Two recorders on one port: 127.0.0.1 (allowed in these tests) and 127.0.0.2 (refused)."""
    port = free_port()
    found = {}
    for ip in ("127.0.0.1", "127.0.0.2"):
        server = ThreadingHTTPServer((ip, port), _Recorder)
        server.hits, server.location, server.release = [], "", threading.Event()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        found[ip] = server
    yield found
    for server in found.values():
        server.release.set()
        server.shutdown()
        server.server_close()


def _resolver(monkeypatch, *answers: list[str]) -> list[str]:
    """The event loop's name resolution answers `answers[i]` on its i-th call (the last one after)."""
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        calls.append(host)
        ips = answers[min(len(calls), len(answers)) - 1]
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                for ip in ips]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


def _fetch(url: str, allowed: list[str]) -> bytes:
    return asyncio.run(fetch_image_bytes(url, max_bytes=1 << 20, timeout_s=5, allowed_networks=allowed))


def test_a_name_resolving_public_then_loopback_is_refused_unconnected(servers, monkeypatch):
    port = servers["127.0.0.1"].server_address[1]
    _resolver(monkeypatch, ["8.8.8.8", "127.0.0.1"])
    with pytest.raises(ImageLoadError, match="SRPO_IMAGE_URL_ALLOWED_NETWORKS"):
        _fetch(f"http://images.example.test:{port}/img.png", [])
    assert servers["127.0.0.1"].hits == []


def test_the_connection_goes_to_the_checked_address_not_a_second_answer(servers, monkeypatch):
    port = servers["127.0.0.1"].server_address[1]
    # DNS rebinding: the check sees an allowed address, a second lookup would answer another one.
    _resolver(monkeypatch, ["127.0.0.1"], ["127.0.0.2"])
    data = _fetch(f"http://images.example.test:{port}/img.png", ["127.0.0.1/32"])
    assert Image.open(io.BytesIO(data)).size == (8, 8)
    assert servers["127.0.0.1"].hits == [("/img.png", f"images.example.test:{port}")]  # the name, not the IP
    assert servers["127.0.0.2"].hits == []


def test_a_redirect_to_a_refused_host_is_refused_unconnected(servers):
    port = servers["127.0.0.1"].server_address[1]
    servers["127.0.0.1"].location = f"http://127.0.0.2:{port}/img.png"
    with pytest.raises(ImageLoadError, match="127.0.0.2"):
        _fetch(f"http://127.0.0.1:{port}/hop", ["127.0.0.1/32"])
    assert servers["127.0.0.1"].hits == [("/hop", f"127.0.0.1:{port}")]
    assert servers["127.0.0.2"].hits == []


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_a_source_over_the_byte_cap_is_refused(servers, path):
    port = servers["127.0.0.1"].server_address[1]
    with pytest.raises(ImageLoadError, match=r"larger than 1000 bytes \(SRPO_IMAGE_FETCH_MAX_BYTES\)"):
        asyncio.run(fetch_image_bytes(f"http://127.0.0.1:{port}{path}", max_bytes=1000, timeout_s=5,
                                      allowed_networks=["127.0.0.1/32"]))


def test_a_source_that_never_answers_times_out(servers):
    port = servers["127.0.0.1"].server_address[1]
    began = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"timed out after 0.5 s \(SRPO_IMAGE_FETCH_TIMEOUT_S\)"):
        asyncio.run(fetch_image_bytes(f"http://127.0.0.1:{port}/stall", max_bytes=1000, timeout_s=0.5,
                                      allowed_networks=["127.0.0.1/32"]))
    assert time.monotonic() - began < 5  # given up, long before the server would answer (10 s)
    assert servers["127.0.0.1"].hits == [("/stall", f"127.0.0.1:{port}")]


def test_redirects_are_followed_a_bounded_number_of_times(servers):
    port = servers["127.0.0.1"].server_address[1]
    servers["127.0.0.1"].location = "/hop"  # a loop
    with pytest.raises(ImageLoadError, match="too many redirects"):
        _fetch(f"http://127.0.0.1:{port}/hop", ["127.0.0.1/32"])
    assert len(servers["127.0.0.1"].hits) == 4  # the URL and 3 redirects
    servers["127.0.0.1"].location = "/img.png"  # within the limit: followed
    assert Image.open(io.BytesIO(_fetch(f"http://127.0.0.1:{port}/hop", ["127.0.0.1/32"]))).size == (8, 8)


def test_a_source_over_the_pixel_cap_is_refused_before_decoding(client):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(buf, "PNG")  # 20 000 pixels, a few hundred bytes
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    response = client.post(I2I, json={"prompt": "x", "image_url": uri, "num_inference_steps": 10, "sync_mode": True})
    _assert_contract_error(response, 422)
    assert "200x100, more than 16384 pixels (SRPO_IMAGE_MAX_SOURCE_PIXELS)" in response.json()["detail"]


def test_refused_image_urls_and_webhooks_name_their_setting(client):
    response = client.post(I2I, json={"prompt": "x", "image_url": "http://169.254.169.254/latest/meta-data"})
    _assert_contract_error(response, 422)
    assert "SRPO_IMAGE_URL_ALLOWED_NETWORKS" in response.json()["detail"]
    response = client.post(f"/queue{T2I}", json=SMALL, params={"fal_webhook": "http://[::ffff:127.0.0.1]/hook"})
    _assert_contract_error(response, 422)
    assert "SRPO_WEBHOOK_ALLOWED_NETWORKS" in response.json()["detail"][0]["msg"]


def test_data_uri_sources_still_work(client):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    response = client.post(I2I, json={"prompt": "x", "image_url": uri, "num_inference_steps": 10, "sync_mode": True})
    assert response.status_code == 200 and response.json()["images"][0]["width"] == 32
