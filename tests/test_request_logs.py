"""Every log line of a request carries its fal request id; fal's status polls stay out of the INFO log."""

from __future__ import annotations

import logging
import time
from typing import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from ray.serve._private.logging_utils import access_log_msg

from deployments.logs import RoutineLinesAtDebug
from models.pipeline import SRPOPipeline
from server.app import build_app
from server.logging_context import install as tag_logs_with_request_ids, request_context
from server.service import InProcessBackend, SRPOService
from settings import get_settings
from tests.conftest import CPU

SMALL = {"prompt": "x", "image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def client(tiny_model_dir, tiny_safety_dir, tmp_path_factory) -> Iterator[TestClient]:
    pipeline = SRPOPipeline(tiny_model_dir, tiny_safety_dir, CPU, torch.float32)
    state = tmp_path_factory.mktemp("logs")
    settings = get_settings().model_copy(update={"storage_dir": state / "files",
                                                 "queue_db_path": state / "requests.sqlite3"})
    with TestClient(build_app(SRPOService(InProcessBackend(pipeline), settings))) as client:
        yield client


def _lines_of(caplog, request_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "fal_request_id", None) == request_id]


def test_a_sync_requests_log_lines_carry_its_request_id(client, caplog):
    with caplog.at_level(logging.INFO):
        response = client.post("/fal-ai/flux/srpo", json=SMALL)
        logging.getLogger("tests").info("outside any request")
    assert response.status_code == 200
    request_id = response.headers["x-fal-request-id"]
    lines = _lines_of(caplog, request_id)
    assert any("generated 1 image(s)" in line for line in lines), caplog.text
    assert all(line.startswith(f"[{request_id}] ") for line in lines)
    assert "outside any request" in caplog.messages  # no id, no prefix


def test_a_queued_requests_log_lines_carry_the_id_its_submit_returned(client, caplog):
    with caplog.at_level(logging.INFO):
        request_id = client.post("/queue/fal-ai/flux/srpo", json=SMALL).json()["request_id"]
        deadline = time.monotonic() + 60
        while client.get(f"/queue/fal-ai/flux/requests/{request_id}/status").json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline, "the queued request never completed"
    assert any(f"[{request_id}] generated 1 image(s)" in line for line in _lines_of(caplog, request_id))


def _serve_access_logger(level: int) -> tuple[logging.Logger, list[logging.LogRecord]]:
    """A logger like Serve's replica logger, with the Ingress's filter, recording what it would write."""
    logger = logging.getLogger(f"tests.serve_access.{level}")
    logger.setLevel(level)
    logger.propagate = False
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.handlers = [handler]
    logger.filters = [RoutineLinesAtDebug(logger)]
    return logger, seen


def _access(logger: logging.Logger, method: str, route: str, status: str) -> None:
    # Serve's own message builder and `extra`, as its replica writes an access-log line.
    logger.info(access_log_msg(method=method, route=route, status=status, latency_ms=1.5),
                extra={"serve_access_log": True, "skip_context_filter": True})


def test_status_polls_are_not_logged_at_info():
    logger, seen = _serve_access_logger(logging.INFO)
    _access(logger, "GET", "/queue/fal-ai/flux/requests/{request_id}/status", "202")
    _access(logger, "POST", "/queue/fal-ai/flux/srpo", "200")
    _access(logger, "GET", "/queue/fal-ai/flux/requests/{request_id}/status", "404")  # a failure still shows
    assert [r.getMessage().split()[:3] for r in seen] == [
        ["POST", "/queue/fal-ai/flux/srpo", "200"], ["GET", "/queue/fal-ai/flux/requests/{request_id}/status", "404"]]


def test_status_polls_are_logged_at_debug_when_asked():
    logger, seen = _serve_access_logger(logging.DEBUG)
    _access(logger, "GET", "/queue/fal-ai/flux/requests/{request_id}/status", "200")
    assert [r.levelname for r in seen] == ["DEBUG"]


def test_the_routers_start_is_not_logged_at_info():
    from ray.serve._private.router import SharedRouterLongPollClient

    logger, seen = _serve_access_logger(logging.INFO)
    # As Serve's router writes it, alone and inside the first request (which tags it with its id).
    tag_logs_with_request_ids()
    client = object.__repr__(object.__new__(SharedRouterLongPollClient))
    logger.info(f"Started {client}.")
    with request_context("8f1c2d4e-0000-4000-8000-000000000000"):
        logger.info(f"Started {client}.")
    logger.info("Started inter-deployment gRPC server on port 5")  # other lines stay
    assert [r.getMessage() for r in seen] == ["Started inter-deployment gRPC server on port 5"]
