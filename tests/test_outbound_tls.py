"""https `image_url` fetches and webhooks through the pinned connection (server/outbound.py): the
certificate is still checked against the URL's name, and a mismatch is reported as a certificate error.

Real TLS servers on 127.0.0.1 with certificates from a test CA; the test's name resolves to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from api.queue_schemas import WebhookBody
from server.image_fetch import fetch_image_bytes
from server.images import ImageLoadError
from server.queue.webhooks import deliver_webhook
from settings import get_settings
from tests.certs import write_private_ca_and_server_cert

NAME = "images.example.test"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, "PNG")
        self._answer(buf.getvalue())

    def do_POST(self) -> None:  # noqa: N802
        self.server.posts.append(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer(b"{}")

    def _answer(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_) -> None:
        return None


def _tls_server(folder: Path, cert_name: str) -> tuple[ThreadingHTTPServer, Path]:
    """A TLS server on 127.0.0.1 whose certificate names `cert_name`; (server, CA that signed it)."""
    ca, cert, key = write_private_ca_and_server_cert(folder, cert_name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.posts = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, ca


@pytest.fixture(params=[NAME, "someone-else.example.test"], ids=["matching", "other-name"])
def tls(request, tmp_path, monkeypatch) -> Iterator[tuple[ThreadingHTTPServer, bool]]:
    """(server, whether its certificate matches NAME); NAME resolves to 127.0.0.1 and the CA is trusted
    the way an operator trusts a private CA (SSL_CERT_FILE)."""
    server, ca = _tls_server(tmp_path, request.param)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        return real("127.0.0.1" if host == NAME else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield server, request.param == NAME
    server.shutdown()
    server.server_close()


def test_https_image_url(tls):
    server, matching = tls
    url = f"https://{NAME}:{server.server_address[1]}/img.png"
    fetch = fetch_image_bytes(url, max_bytes=1 << 20, timeout_s=10, allowed_networks=["127.0.0.1/32"])
    if matching:
        assert Image.open(io.BytesIO(asyncio.run(fetch))).size == (8, 8)
    else:
        with pytest.raises(ImageLoadError, match="TLS certificate verification failed"):
            asyncio.run(fetch)


def test_https_webhook(tls, caplog):
    server, matching = tls
    settings = get_settings().model_copy(update={"webhook_allowed_networks": ["127.0.0.1/32"],
                                                 "webhook_attempts": 1, "webhook_timeout_s": 10})
    body = WebhookBody(request_id="r1", gateway_request_id="r1", status="OK", payload={"images": []}, error=None)
    url = f"https://{NAME}:{server.server_address[1]}/hook"
    with caplog.at_level(logging.WARNING, logger="server.queue.webhooks"):
        delivered = asyncio.run(deliver_webhook(url, body, settings))
    assert delivered is matching
    assert len(server.posts) == (1 if matching else 0)
    if matching:
        assert WebhookBody.model_validate_json(server.posts[0]) == body
    else:
        assert "TLS certificate verification failed" in caplog.text, caplog.text
