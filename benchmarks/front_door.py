"""The front door under many waiting clients (issue 25), loopback only, bounded in time.

    .venv/bin/python -m benchmarks.front_door [--seconds 5] [--clients 500] [--depths 0,10000,100000]

In one run: the floor (a bare uvicorn app answering a status-sized JSON), then per store (SQLite,
Redis) one Serve instance as it ships (HAProxy ingress, throughput-optimized, tiny model) and, per
queue depth (requests waiting, filled through the store): the trivial route (/livez) and the status
route of waiting requests (of completed ones when none waits; rps, p99; closed loop), submits,
cancels, and N emulated fal Python clients, each re-polling its waiting request's status 0.1 s
after every answer (errors, p99 of the answers less the deliberate hold, and how late each client
first showed a position counting a cancel the benchmark made ahead of it). Prints a markdown
table; writes JSON with --out.

What a cluster's front door sees, on one machine: the model's replicas run at the lowest CPU priority
(on a cluster they have GPU nodes of their own), and the Ingress runs queued requests in every row,
the empty queue's included, so that rows differ by the queue's depth alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager, contextmanager, nullcontext
from pathlib import Path
from typing import AsyncIterator, Iterator

import psutil

from models.tiny import ensure_tiny_model
from server.queue.store import NewRequest, RedisRequestStore, RequestStore, SqliteRequestStore
from settings import get_settings
from tests.harness import free_port, running_serve, tiny_env

SUBMIT = json.dumps({"prompt": "x", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}).encode()
STATUS = "/queue/fal-ai/flux/requests/{}/status"
POLL_GAP_S = 0.1  # fal_client's pause between status polls
CONNECTIONS = 32
MODEL_REPLICAS = ("Denoiser", "TextEncoder", "Decoder")
CANCELS = 5000  # requests filled for the cancel loop (~1,500 cancels a second here)
FLOOR_APP = '''
from fastapi import FastAPI
from fastapi.responses import JSONResponse
app = FastAPI()
BODY = {"status": "IN_QUEUE", "queue_position": 7, "request_id": "0" * 36, "response_url": "x" * 80,
        "status_url": "x" * 90, "cancel_url": "x" * 90}
@app.get("/livez")
async def livez():
    return JSONResponse(BODY)
'''


class Http:
    """A minimal HTTP/1.1 keep-alive client (the load generator shares the machine: keep it cheap)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readline()
        if not status_line:
            self.writer = None
            raise ConnectionError("closed")
        length, chunked = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value:
                chunked = True
        if chunked:
            data = b""
            while (size := int((await self.reader.readline()).strip(), 16)) > 0:
                data += await self.reader.readexactly(size + 2)
            await self.reader.readline()
        else:
            data = await self.reader.readexactly(length)
        return int(status_line.split()[1]), data


def p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * (len(values) - 1))] * 1000 if values else float("nan")


def quiet_heap() -> None:
    """All this process holds so far out of the cyclic collector's sight: a full collection over its heap
    (torch, Ray, the requests just filled) stalls every client's clock for a third of a second or more."""
    gc.collect()
    gc.freeze()


async def lag_ticker(stop: float, lags: list[float]) -> None:
    """This process's event-loop delays until `stop`: the load generator's own share of the times."""
    while time.monotonic() < stop:
        began = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append(time.monotonic() - began - 0.01)


async def closed_loop(port: int, paths, seconds: float, method: str = "GET", body: bytes = b"") -> dict:
    """CONNECTIONS clients, each sending the next request as soon as the previous one is answered."""
    quiet_heap()
    latencies, errors, stop, loop_lags = [], 0, time.monotonic() + seconds, []

    async def one(i: int) -> None:
        nonlocal errors
        http = Http(port)
        n = 0
        while time.monotonic() < stop:
            began = time.monotonic()
            try:
                code, _ = await http.call(method, paths(i, n), body)
            except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                http = Http(port)
                continue
            n += 1
            if code >= 400:
                errors += 1
            latencies.append(time.monotonic() - began)

    await asyncio.gather(lag_ticker(stop, loop_lags), *(one(i) for i in range(CONNECTIONS)))
    return {"rps": round(len(latencies) / seconds), "p99_ms": round(p99(latencies), 1), "errors": errors,
            "load_generator_lag_max_ms": round(max(loop_lags) * 1000, 1)}


async def waiting_clients(port: int, ids: list[str], head: list[str], seconds: float, store: RequestStore,
                          hold_s: float) -> dict:
    """One emulated fal Python client per id, each starting at a random moment of the first second
    (as their submits would arrive); once all have been answered, the benchmark cancels a request ahead
    of them once a second and notes when each client first shows a position that counts the cancel."""
    latencies, firsts, errors = [], [], 0
    answers: dict[str, list[tuple[float, int]]] = {request_id: [] for request_id in ids}  # (received, position)
    moves: list[tuple[float, dict[str, int]]] = []  # (cancelled at, each client's position just after)
    # The benchmark's own first read of every position builds the store's index of the queue in this
    # process (a scan at depth): done here, it would stall every client's clock at the first cancel.
    await store.positions(ids)
    quiet_heap()
    loop_lags: list[float] = []
    stop = time.monotonic() + seconds
    rng = random.Random(0)

    async def client(request_id: str) -> None:
        nonlocal errors
        await asyncio.sleep(rng.random())
        http, last = Http(port), None
        while time.monotonic() < stop:
            began = time.monotonic()
            try:
                code, data = await http.call("GET", STATUS.format(request_id))
            except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                http = Http(port)
                continue
            took = time.monotonic() - began
            if code >= 400:
                errors += 1
            else:
                position = json.loads(data).get("queue_position")
                # A repeated ask may be held by design (up to hold_s): what counts is the time beyond it.
                if last is None:
                    firsts.append(took)
                else:
                    latencies.append(max(0.0, took - hold_s))
                answers[request_id].append((time.monotonic(), position))
                last = position
            await asyncio.sleep(POLL_GAP_S)

    async def mover(head: list[str]) -> None:
        # Moves start once every client has had its first answer: a client still waiting for its first
        # answer is waiting for a connection (first answers, reported apart), not for a position change.
        while not all(answers.values()) and time.monotonic() < stop - 2:
            await asyncio.sleep(0.05)
        while time.monotonic() < stop - 1 and head:
            await asyncio.sleep(1.0)
            at = time.monotonic()
            await store.cancel(head.pop(0))
            # Read at once: a claim in between only lowers these, so the lag found is an upper bound.
            moves.append((at, await store.positions(ids)))

    await asyncio.gather(lag_ticker(stop, loop_lags), mover(head), *(client(i) for i in ids))
    lags, unseen = [], 0
    for at, truth in moves:
        for request_id, position in truth.items():
            seen = next((received for received, shown in answers[request_id] if received > at and shown <= position),
                        None)
            if seen is None:
                unseen += 1
            else:
                lags.append(seen - at)
    return {"clients": len(ids), "errors": errors, "status_p99_beyond_hold_ms": round(p99(firsts + latencies), 1),
            "first_answer_p99_ms": round(p99(firsts), 1), "position_lag_max_s": round(max(lags), 2) if lags else None,
            "position_lag_p99_s": round(p99(lags) / 1000, 2) if lags else None, "position_changes_seen": len(lags),
            "position_changes_unseen": unseen, "load_generator_lag_p99_ms": round(p99(loop_lags), 1),
            "load_generator_lag_max_ms": round(max(loop_lags) * 1000, 1)}


def _request() -> NewRequest:
    return NewRequest(id=str(uuid.uuid4()), endpoint="fal-ai/flux/srpo", base_url="http://127.0.0.1",
                      input={"prompt": "x", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1})


async def fill(store: RequestStore, count: int) -> list[str]:
    ids = []
    for start in range(0, count, 500):
        batch = [_request() for _ in range(min(500, count - start))]
        await asyncio.gather(*(store.enqueue(r, 10**9) for r in batch))
        ids += [r.id for r in batch]
    return ids


async def finished(store: RequestStore, count: int) -> list[str]:
    """`count` completed (cancelled) requests: with an empty queue, the status reads of a few waiting
    requests would ask each again within the repeat window, and such asks are held by design; a
    completed request's are never held."""
    ids = await fill(store, count)
    for request_id in ids:
        await store.cancel(request_id)
    for _ in range(600):  # one may have been running: its worker completes it as cancelled
        records = [await store.get(request_id, logs=False) for request_id in ids]
        if all(record and record.status == "COMPLETED" for record in records):
            return ids
        await asyncio.sleep(0.05)
    raise RuntimeError("cancelled requests did not complete")


@contextmanager
def floor_server() -> Iterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "floor_app.py").write_text(FLOOR_APP)
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "floor_app:app", "--port", str(port),
                                 "--host", "127.0.0.1", "--log-level", "warning", "--no-access-log"], cwd=folder)
        try:
            import httpx
            for _ in range(200):
                try:
                    httpx.get(f"http://127.0.0.1:{port}/livez")
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def redis_server() -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", folder], stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def model_aside() -> None:
    """Every thread of the model's replicas at the lowest CPU priority: on a cluster they run on GPU
    nodes of their own, while here the tiny model's forward passes would take the front door's two
    cores whenever the queue holds work."""
    for process in psutil.Process().children(recursive=True):
        try:
            if any(f"ServeReplica:srpo:{name}" in " ".join(process.cmdline()) for name in MODEL_REPLICAS):
                for thread in process.threads():
                    os.setpriority(os.PRIO_PROCESS, thread.id, 19)
        except (psutil.Error, ProcessLookupError):  # gone meanwhile
            continue


@asynccontextmanager
async def worker_busy(store: RequestStore) -> AsyncIterator[None]:
    """One request handed to the queue whenever none waits, so the Ingress runs requests in every row as
    it does with a deep queue: rows then differ by the queue's depth alone. (Running requests take a
    fifth of the Ingress's rate of trivial answers here; with an idle worker the empty queue would
    look faster for that reason only.)"""
    running = True

    async def feed() -> None:
        while running:
            if await store.pending() == 0:
                await store.enqueue(_request(), 10**9)
            await asyncio.sleep(0.01)

    feeder = asyncio.ensure_future(feed())
    try:
        yield
    finally:
        running = False
        await feeder


async def measure_depth(port: int, store: RequestStore, sample: list[str], args, hold_s: float) -> dict:
    """One row: the routes' rates and tails, then the waiting clients, at the queue's current depth."""
    # Not measured: the Ingress catches up with the requests the benchmark just wrote straight into
    # the store (tens of thousands in seconds, which no client submits).
    await closed_loop(port, lambda i, n: STATUS.format(sample[-1 - i % len(sample)]), 1)
    row = {"trivial": await closed_loop(port, lambda i, n: "/livez", args.seconds),
           "status": await closed_loop(
               port, lambda i, n: STATUS.format(sample[(i * 997 + n * CONNECTIONS) % len(sample)]), args.seconds),
           "submit": await closed_loop(port, lambda i, n: "/queue/fal-ai/flux/srpo", args.seconds, "POST", SUBMIT)}
    # Enough for the whole loop, all waiting: a cancel of an unknown id (404) costs less.
    it = iter(await fill(store, CANCELS))
    row["cancel"] = await closed_loop(port, lambda i, n: STATUS.format(next(it, "gone"))[:-7] + "/cancel",
                                      min(args.seconds, 2), "PUT")
    for request_id in it:  # the ones the loop did not reach
        await store.cancel(request_id)
    head = await fill(store, 10)  # ahead of the clients: the benchmark cancels these
    clients = await fill(store, args.clients)
    row["waiting_clients"] = await waiting_clients(port, clients, head, args.seconds * 2, store, hold_s)
    for request_id in head + clients:
        await store.cancel(request_id)
    return row


def run_store(kind: str, args, rows: list[dict]) -> None:
    state = Path(tempfile.mkdtemp(prefix="front-door-"))
    with (redis_server() if kind == "redis" else nullcontext()) as url:
        extra = {"SRPO_REDIS_URL": url} if url else {}
        tiny_root = get_settings().tiny_dir
        ensure_tiny_model(tiny_root)  # once, before the replicas look for it
        env = tiny_env(tiny_root, state, SRPO_QUEUE_MAX_PENDING="1000000",
                       SRPO_QUEUE_CONCURRENCY="1", **extra)
        with running_serve(env) as base:
            port = int(base.rsplit(":", 1)[1])
            model_aside()
            hold_s = get_settings().queue_status_hold_s

            async def scenario() -> None:
                store = (RedisRequestStore(url, 3600) if url
                         else SqliteRequestStore(state / "queue" / "requests.sqlite3", 3600))
                waiting: list[str] = []
                for depth in args.depths:
                    waiting += await fill(store, depth - len(waiting))
                    sample = waiting[-5000:] or await finished(store, 50)
                    async with worker_busy(store):
                        row = await measure_depth(port, store, sample, args, hold_s)
                    row = {"store": kind, "depth": depth, **row}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                await store.close()

            asyncio.run(scenario())


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("SRPO_HIGH_THROUGHPUT_INGRESS", "1")  # the data plane the Kubernetes manifests ship
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[0, 10_000, 100_000])
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with floor_server() as port:
        floor = asyncio.run(closed_loop(port, lambda i, n: "/livez", args.seconds))
    print(json.dumps({"floor": floor}), flush=True)
    rows: list[dict] = []
    try:
        for kind in args.stores.split(","):
            run_store(kind, args, rows)
    finally:
        gc.unfreeze()  # the heap kept out of the collector's sight (`quiet_heap`) is this process's again
    load = os.getloadavg()
    print(f"\nfloor (bare uvicorn): {floor['rps']} rps, p99 {floor['p99_ms']} ms; load average {load[0]:.1f}\n")
    print("| store | waiting | /livez rps (% floor) | p99 | status rps | p99 | submits/s | p99 | cancel p99 "
          "| clients: errors | status p99 beyond hold (first answers) | position lag max (p99, unseen) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, s, u, c, w = r["trivial"], r["status"], r["submit"], r["cancel"], r["waiting_clients"]
        print(f"| {r['store']} | {r['depth']} | {t['rps']} ({100 * t['rps'] / floor['rps']:.0f}%) | {t['p99_ms']} "
              f"| {s['rps']} | {s['p99_ms']} | {u['rps']} | {u['p99_ms']} | {c['p99_ms']} | {w['errors']} "
              f"| {w['status_p99_beyond_hold_ms']} ({w['first_answer_p99_ms']}) | {w['position_lag_max_s']} s "
              f"({w['position_lag_p99_s']} s, {w['position_changes_unseen']}) |")
    if args.out:
        args.out.write_text(json.dumps({"floor": floor, "rows": rows, "load_average": load}, indent=1))


if __name__ == "__main__":
    main()
