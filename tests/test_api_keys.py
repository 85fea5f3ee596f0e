"""API keys guard every route except the documented public set (README, "API keys").

The routes come from the app itself, so a route added later is covered without editing this file.
Through the real HTTP app (the in-process pipeline behind it); nothing here generates an image.
"""

from __future__ import annotations

import io
import re
from typing import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route

from models.pipeline import SRPOPipeline
from server.app import build_app
from server.service import InProcessBackend, SRPOService
from settings import get_settings
from tests.conftest import CPU

KEY = "route-test-key"
# The README's public set: probes, output files and the pages (with their assets).
PUBLIC = {"/health", "/livez", "/files/{name}", "/", "/docs", "/redoc", "/openapi.json", "/playground/config"}
PUBLIC_MOUNTS = {"/static"}
PARAMS = {"name": "0" * 32 + ".png", "request_id": "00000000-0000-0000-0000-000000000000"}


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    pipeline = SRPOPipeline(tiny_model_dir, None, CPU, torch.float32)
    state = tmp_path_factory.mktemp("keys")
    settings = get_settings().model_copy(update={"storage_dir": state / "files", "api_keys": [KEY],
                                                 "queue_db_path": state / "requests.sqlite3"})
    return build_app(SRPOService(InProcessBackend(pipeline), settings))


@pytest.fixture(scope="module")
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def _calls(app) -> list[tuple[str, str, str]]:
    """(method, template, concrete path) of every route the app serves: those in its OpenAPI schema (the
    included routers' too) and the app's own routes (the pages hidden from the schema)."""
    found = {(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item}
    for route in app.routes:
        if isinstance(route, Route):  # FastAPI's and Starlette's (e.g. /openapi.json); not mounts
            found |= {(method, route.path) for method in route.methods or ()}
    return [(method, template, re.sub(r"{(\w+)(:\w+)?}", lambda m: PARAMS[m.group(1)], template))
            for method, template in sorted(found)]


def _is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def test_every_route_outside_the_public_set_needs_a_key(app, client):
    calls = _calls(app)
    protected = [c for c in calls if c[1] not in PUBLIC]
    assert {c[1] for c in calls} >= PUBLIC, "a documented public page is gone"
    assert len(protected) >= 10, protected  # fal, queue and OpenAI routes are all found
    for method, template, path in protected:
        for headers in ({}, {"Authorization": "Key wrong"}, {"Authorization": f"Bearer {KEY}x"}):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, template, headers, response.status_code)
            body = response.json()
            if _is_openai(path):
                assert body["error"]["code"] == "invalid_api_key", body
            else:
                assert body["error_type"] == "unauthorized" and response.headers["www-authenticate"] == "Key"
        scheme = "Bearer" if _is_openai(path) else "Key"
        accepted = client.request(method, path, headers={"Authorization": f"{scheme} {KEY}"})
        assert accepted.status_code != 401, (method, template)  # e.g. 422 for an empty body, 404 for an id
    for method, template, path in calls:
        if template in PUBLIC:
            assert client.request(method, path).status_code != 401, (method, template)


def test_fal_keys_are_not_openai_bearer_tokens(client):
    """`Bearer` is OpenAI's scheme, accepted on /v1/ only."""
    response = client.post("/fal-ai/flux/srpo", json={}, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 401


def test_static_assets_are_public(app, client):
    mounts = {route.path for route in app.routes if isinstance(route, Mount)}
    assert {mount.rsplit("/", 1)[0] for mount in mounts} == PUBLIC_MOUNTS
    assert client.get("/static/no-such-asset.js").status_code == 404  # reached, not refused


@pytest.mark.parametrize("method, target", [
    ("POST", "https://fal.run/fal-ai/flux/srpo"),
    ("POST", "https://queue.fal.run/fal-ai/flux/srpo/image-to-image"),
    ("GET", f"https://queue.fal.run/fal-ai/flux/requests/{PARAMS['request_id']}/status"),
    ("PUT", f"https://queue.fal.run/fal-ai/flux/requests/{PARAMS['request_id']}/cancel"),
])
def test_the_fal_proxy_route_needs_a_key_for_what_it_reaches(client, method, target):
    headers = {"x-fal-target-url": target}
    assert client.request(method, "/api/fal/proxy", headers=headers).status_code == 401
    with_key = client.request(method, "/api/fal/proxy", headers=headers | {"Authorization": f"Key {KEY}"})
    assert with_key.status_code in (404, 422), with_key.text  # reached the route: an empty body or unknown id


def test_openai_edits_multipart_needs_a_key(client):
    files = {"image": ("x.png", io.BytesIO(b"not read"), "image/png")}
    response = client.post("/v1/images/edits", files=files, data={"prompt": "x"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("path", ["/files/..%2Fqueue%2Ffal-ai%2Fflux%2Fsrpo", "/static/..%2F..%2Fv1%2Fmodels",
                                  "/health/../v1/models", "/files/%2E%2E/v1/models"])
def test_public_prefixes_do_not_open_other_routes(client, path):
    response = client.request("POST" if "queue" in path else "GET", path)
    assert response.status_code in (401, 404), (path, response.status_code)
