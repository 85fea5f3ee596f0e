"""Comparing served images with the in-process reference pipeline's pixels."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
from PIL import Image


def pixels(url: str, client: httpx.Client) -> np.ndarray:
    """The RGB pixels behind an output URL (a data URI or a file the server serves)."""
    if url.startswith("data:"):
        data = base64.b64decode(url.split(",", 1)[1])
    else:
        response = client.get(url)
        assert response.status_code == 200
        data = response.content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def assert_same_pixels(got: np.ndarray, want: np.ndarray, max_diff: int = 2) -> None:
    # Replicas run torch with other thread counts than this process, which may round a value
    # across a uint8 step (JPEG's block transform spreads such a step a little); anything
    # beyond that is a real difference.
    assert got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= max_diff and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
