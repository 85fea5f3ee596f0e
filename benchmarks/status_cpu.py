"""CPU per status read against /livez, in process: the app's own cost, without HTTP or Serve.

    .venv/bin/python -m benchmarks.status_cpu [--store sqlite|redis] [--reads 3000] [--waiting 1000] [--profile 25]

Builds the HTTP app over the store (SQLite, or a redis-server started on loopback) with `--waiting`
queued requests (nothing runs them), then calls it at the ASGI level (the scope a server hands over)
`--reads` times for /livez and for the status route of waiting requests, round-robin over them; no
status hold (each read is answered at once). Prints the CPU microseconds per read of each (process time, best of three rounds) and their
ratio; with `--profile N`, cProfile's N largest cumulative entries of a status round.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from server.app import build_app
from benchmarks.front_door import redis_server
from server.queue.store import NewRequest, RedisRequestStore, SqliteRequestStore
from server.service import SRPOService
from settings import get_settings
from tests.test_status_holds import AllBusy

STATUS = "/queue/fal-ai/flux/requests/{}/status"
HEADERS = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"python-httpx/0.28"), (b"accept", b"*/*")]


def _scope(path: str, query: bytes = b"") -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query, "headers": HEADERS,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


async def _call(app, path: str, query: bytes = b"") -> int:
    status = 0

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(path, query), receive, send)
    return status


async def _round(app, paths: list[str], reads: int, expect: int) -> float:
    """CPU microseconds per read."""
    began = time.process_time()
    for i in range(reads):
        assert await _call(app, paths[i % len(paths)]) == expect
    return (time.process_time() - began) / reads * 1e6


async def measure(reads: int, waiting: int, profile: int, root: Path, redis_url: str | None = None) -> dict:
    settings = get_settings().model_copy(update={
        "storage_dir": root / "files", "queue_db_path": root / "requests.sqlite3", "queue_status_hold_s": 0.0})
    store = (RedisRequestStore(redis_url, settings.result_ttl_s) if redis_url
             else SqliteRequestStore(settings.queue_db_path, settings.result_ttl_s))
    for i in range(waiting):
        await store.enqueue(NewRequest(id=f"req-{i:06d}", endpoint="fal-ai/flux/srpo", input={"prompt": "x"},
                                       base_url="http://127.0.0.1:8000"), waiting + 1)
    app = build_app(SRPOService(AllBusy(), settings), store=store)
    status_paths = [STATUS.format(f"req-{i:06d}") for i in range(0, waiting, max(1, waiting // 100))]
    for paths, expect in ((["/livez"], 200), (status_paths, 202)):  # warm up
        await _round(app, paths, 200, expect)
    livez = min([await _round(app, ["/livez"], reads, 200) for _ in range(3)])
    status = min([await _round(app, status_paths, reads, 202) for _ in range(3)])
    out = {"store": "redis" if redis_url else "sqlite", "reads": reads, "waiting": waiting,
           "livez_us": round(livez, 1), "status_us": round(status, 1),
           "status_share_of_livez_rate": round(livez / status, 3)}
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await _round(app, status_paths, reads, 202)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(profile)
    await store.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--waiting", type=int, default=1000)
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's N largest entries of a status round")
    args = parser.parse_args(argv)
    redis = redis_server() if args.store == "redis" else nullcontext()
    with tempfile.TemporaryDirectory() as root, redis as url:
        out = asyncio.run(measure(args.reads, args.waiting, args.profile, Path(root), url))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
