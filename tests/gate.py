"""An image server that answers only when a test says so: a request whose `image_url` points at it holds
whatever it occupies (a queue slot, a synchronous slot) for exactly as long as the test needs."""

from __future__ import annotations

import io
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import numpy as np
from PIL import Image


# Longer than any test that holds a request: a gate answers when the test opens it (at the latest when
# its block ends), never by itself while the test still counts on it being shut.
HOLD_S = 600


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.hits.append(self.path)
        self.server.opened.wait(HOLD_S)
        buf = io.BytesIO()
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "PNG")
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(buf.getvalue())))
            self.end_headers()
            self.wfile.write(buf.getvalue())
        except (BrokenPipeError, ConnectionResetError):  # the request stopped waiting (cancelled, timed out)
            pass

    def log_message(self, *args):
        return None


class Gate:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.url = f"http://127.0.0.1:{server.server_address[1]}/source.png"
        self.hits: list[str] = server.hits  # paths requested so far, answered or waiting
        self.open = server.opened.set

    def held_body(self, **fields) -> dict:
        """An image-to-image body whose source is this gate's image (allow 127.0.0.1 in
        SRPO_IMAGE_URL_ALLOWED_NETWORKS)."""
        return {"prompt": "held", "image_url": self.url, "strength": 0.5, "num_inference_steps": 10,
                "seed": 1} | fields


@contextmanager
def gate_server() -> Iterator[Gate]:
    """A Gate on 127.0.0.1, opened (releasing any waiting request) when the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.hits, server.opened = [], threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Gate(server)
    finally:
        server.opened.set()
        server.shutdown()
        server.server_close()
