"""Serving overhead on CPU with the tiny model: HTTP through the Serve graph (synchronous route and
the queue: submit, status stream until COMPLETED, result) vs the same request in-process.

    .venv/bin/python -m benchmarks.serving_overhead [--requests 40] [--concurrency 8] [--url URL]

Prints a markdown table; numbers depend on the machine (the tiny model makes the model's own
time small, so this isolates what the serving path adds).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import httpx

from api.schemas import TextToImageInput
from models.pipeline import SRPOPipeline
from models.tiny import ensure_tiny_model
from server.images import encode_image
from server.service import to_generation_request
from settings import get_settings
from tests.harness import running_serve, tiny_env

BODY = {"prompt": "a small benchmark request", "image_size": {"width": 256, "height": 256},
        "num_inference_steps": 4, "seed": 1, "output_format": "jpeg"}


def queued_seconds(client: httpx.Client, base: str) -> float:
    """Submit, follow the SSE status stream to COMPLETED, read the result: what a client waits."""
    began = time.perf_counter()
    submitted = client.post(f"{base}/queue/fal-ai/flux/srpo", json=BODY).json()
    with client.stream("GET", f"{submitted['status_url']}/stream") as events:
        for line in events.iter_lines():
            if line.startswith("data: ") and '"COMPLETED"' in line:
                break
    assert client.get(submitted["response_url"]).status_code == 200
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--url", help="a tiny-preset server already running there, instead of starting one")
    args = parser.parse_args(argv)
    tiny_root = get_settings().tiny_dir
    model_dir, safety_dir = ensure_tiny_model(tiny_root)

    pipe = SRPOPipeline(model_dir, safety_dir, get_settings().resolved_device(), get_settings().resolved_dtype())
    request = to_generation_request(TextToImageInput(**BODY), BODY["seed"])
    in_process = []
    for _ in range(args.requests):
        began = time.perf_counter()
        result = pipe.generate(request)
        [encode_image(px, "jpeg") for px in result.images]
        in_process.append(time.perf_counter() - began)

    with tempfile.TemporaryDirectory() as files, (
        nullcontext(args.url) if args.url else running_serve(tiny_env(Path(tiny_root), Path(files)))
    ) as base:
        url = f"{base}/fal-ai/flux/srpo"
        with httpx.Client(timeout=120) as client:
            for _ in range(5):
                client.post(url, json=BODY)  # warm connections and caches
            sequential = []
            for _ in range(args.requests):
                began = time.perf_counter()
                assert client.post(url, json=BODY).status_code == 200
                sequential.append(time.perf_counter() - began)
            queued = [queued_seconds(client, base) for _ in range(args.requests)]
            total = args.requests * 2
            began = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                codes = list(pool.map(lambda _: client.post(url, json=BODY).status_code, range(total)))
            elapsed = time.perf_counter() - began
            assert all(code == 200 for code in codes)

    med_in, med_http, med_queue = (statistics.median(t) for t in (in_process, sequential, queued))
    print("| measure | value |\n|---|---|")
    print(f"| in-process median (generate + JPEG encode) | {med_in * 1000:.1f} ms |")
    print(f"| HTTP through the Serve graph, median | {med_http * 1000:.1f} ms |")
    print(f"| serving overhead (HTTP - in-process) | {(med_http - med_in) * 1000:.1f} ms |")
    print(f"| queue (submit, status stream, result), median | {med_queue * 1000:.1f} ms |")
    print(f"| queue overhead over the synchronous route | {(med_queue - med_http) * 1000:.1f} ms |")
    print(f"| throughput at {args.concurrency} concurrent clients | {total / elapsed:.1f} req/s ({total} requests) |")


if __name__ == "__main__":
    main()
