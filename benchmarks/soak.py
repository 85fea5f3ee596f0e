"""A soak: the multi-node tiny cluster at about half its capacity for ten minutes, with random faults.

    /work/slot .venv/bin/python -m benchmarks.soak --duration 600

The cluster of tests/cluster.py (the head with the controller, the only proxy, the Ingress, TextEncoder
and Decoder; two "GPU" nodes with a Denoiser each), the queue in a real redis-server (append-only
file) on 127.0.0.1, all on loopback. First a closed loop of `--calibrate-clients` clients measures
the capacity (requests per second, this mix); then requests arrive at random (Poisson) at `--load`
of it for `--duration` seconds, half synchronous, half queued, one in five of 2 images. Faults at
random times (seeded: `--seed`), spread over the run: model-stage replicas SIGKILLed, a GPU node
removed (its processes SIGKILLed) and a new one added later, the queue's Redis stopped for
`--redis-down-s` and started again.

At the end every accepted request must have completed: each synchronous one answered 200, each
queued one COMPLETED with its result; queued submissions refused while Redis was down were never
accepted and are counted apart. RSS per process kind (ingress, denoiser, text encoder, decoder,
controller, proxy, raylet, gcs, redis, Ray's agents, this driver) at the start of the load, at its
end and the peak of a sample every `--sample-every` seconds. Prints a JSON report (also to `--out`);
exits 1 if anything accepted was lost or failed. Results: docs/operations.md ("Soak").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil
import ray

from models.tiny import ensure_tiny_model
from tests.cluster import LocalCluster, cluster_options, deploy, local_cluster
from tests.harness import free_port, start_redis, tiny_env

T2I = "fal-ai/flux/srpo"
REQUESTS = "/queue/fal-ai/flux/requests"
STAGES = ("TextEncoder", "Denoiser", "Decoder")  # retried on a lost replica (server/retry.py)
# Process kinds, by what Ray's process titles and command lines contain; the first match wins.
KINDS = (("ServeReplica:srpo:Ingress", "ingress"), ("ServeReplica:srpo:Denoiser", "denoiser"),
         ("ServeReplica:srpo:TextEncoder", "text encoder"), ("ServeReplica:srpo:Decoder", "decoder"),
         ("ServeController", "serve controller"), ("ProxyActor", "serve proxy"), ("gcs_server", "gcs"),
         ("raylet", "raylet"), ("redis-server", "redis (queue)"), ("RuntimeEnvAgent", "runtime env agent"),
         ("DashboardAgent", "dashboard agent"), ("log_monitor", "log monitor"), ("ray::IDLE", "idle worker"),
         ("autoscaler/_private/monitor.py", "autoscaler monitor"), ("dashboard/dashboard.py", "dashboard"))


def request(rng: random.Random, i: int) -> dict[str, Any]:
    return {"prompt": f"soak {i}", "seed": i, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 8,
            "num_images": 2 if rng.random() < 0.2 else 1, "enable_safety_checker": False}


def kind_of(process: psutil.Process) -> str:
    line = " ".join(process.cmdline())
    if process.pid == os.getpid():
        return "driver (this script)"
    return next((kind for part, kind in KINDS if part in line), f"other: {line[:60]}")


def rss_by_kind() -> dict[str, dict[str, float]]:
    """Resident memory (MiB) and process count of each kind among this script's process tree."""
    me = psutil.Process()
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"processes": 0, "rss_mib": 0.0})
    for process in [me, *me.children(recursive=True)]:
        try:
            kind, rss = kind_of(process), process.memory_info().rss / 2**20
        except psutil.Error:  # gone meanwhile (a killed replica)
            continue
        totals[kind]["processes"] += 1
        totals[kind]["rss_mib"] = round(totals[kind]["rss_mib"] + rss, 1)
    return dict(sorted(totals.items()))


class QueueRedis:
    """The queue's redis-server; restarted on the same port and folder, it keeps what it held."""

    def __init__(self, folder: Path) -> None:
        self.port, self.folder = free_port(), folder
        self.process = start_redis(self.port, folder)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)  # a clean stop writes the append-only file, as a pod's does
        self.process.wait(timeout=30)

    def start(self) -> None:
        self.process = start_redis(self.port, self.folder)


class Soak:
    def __init__(self, local: LocalCluster, redis: QueueRedis, redis_down_s: float, seed: int) -> None:
        self.local, self.redis, self.redis_down_s = local, redis, redis_down_s
        self.rng, self.fault_rng = random.Random(seed), random.Random(seed + 1)
        self.began = time.monotonic()
        self.events: list[tuple[float, str]] = []
        self.outcomes: Counter[str] = Counter()
        self.queued: list[str] = []
        self.lock = threading.Lock()

    def note(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self.began, 1), what))
        print(f"[{self.events[-1][0]:7.1f} s] {what}", flush=True)

    def count(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
        if not outcome.endswith(" 200"):  # when, to lay it against the faults
            self.note(outcome)

    # The load -----------------------------------------------------------------------------------

    def sync_call(self, client: httpx.Client, body: dict) -> str:
        try:
            response = client.post(f"/{T2I}", json=body)
            outcome = f"sync {response.status_code}"
        except httpx.TransportError as exc:
            outcome = f"sync {type(exc).__name__}"
        self.count(outcome)
        return outcome

    def submit(self, client: httpx.Client, body: dict) -> None:
        try:
            response = client.post(f"/queue/{T2I}", json=body)
            outcome = f"submit {response.status_code}"
            if response.status_code == 200:
                with self.lock:
                    self.queued.append(response.json()["request_id"])
        except httpx.TransportError as exc:
            outcome = f"submit {type(exc).__name__}"
        self.count(outcome)

    def capacity(self, seconds: float, clients: int) -> float:
        """Requests per second this mix completes with `clients` synchronous clients back to back."""
        stop = time.monotonic() + seconds

        def loop(worker: int) -> None:
            with httpx.Client(base_url=self.local.base, timeout=300) as client:
                i = 10_000_000 + worker * 100_000
                while time.monotonic() < stop:
                    i += 1
                    self.sync_call(client, request(self.rng, i))

        began = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(loop, range(clients)))
        served = self.outcomes["sync 200"] / (time.monotonic() - began)
        self.outcomes.clear()  # the calibration's own requests are not the soak's
        return served

    def load(self, rate: float, until: float) -> int:
        """Poisson arrivals at `rate` per second until `until` (monotonic): half sync, half queued."""
        futures: list[Future] = []
        with httpx.Client(base_url=self.local.base, timeout=300, limits=httpx.Limits(max_connections=64)) as client, \
                ThreadPoolExecutor(48) as pool:
            i = 0
            while (now := time.monotonic()) < until:
                i += 1
                call = self.sync_call if self.rng.random() < 0.5 else self.submit
                futures.append(pool.submit(call, client, request(self.rng, i)))
                time.sleep(min(self.rng.expovariate(rate), max(0.0, until - now)))
            for future in futures:
                future.result()
        return len(futures)

    # The faults ---------------------------------------------------------------------------------

    def kill_replica(self) -> None:
        stage = self.fault_rng.choice(STAGES)
        names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == "serve" and f"#{stage}#" in a["name"])
        name = self.fault_rng.choice(names)
        try:
            actor = ray.get_actor(name, namespace="serve")
            pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
            os.kill(pid, signal.SIGKILL)
            self.note(f"SIGKILLed a {stage} replica ({name.split('#')[-1]}, pid {pid})")
        except (ray.exceptions.RayError, ProcessLookupError) as exc:  # it was being replaced already
            self.note(f"no {stage} replica to kill: {type(exc).__name__}")

    def remove_node(self) -> None:
        node = self.fault_rng.choice(self.local.gpu_nodes)
        self.local.remove(node)
        self.note(f"removed GPU node {node.node_id[:8]} (its processes SIGKILLed)")

    def add_node(self) -> None:
        node = self.local.add_gpu_node()
        self.note(f"added GPU node {node.node_id[:8]}")

    def restart_redis(self) -> None:
        self.redis.stop()
        self.note("queue Redis stopped")
        time.sleep(self.redis_down_s)  # the outage itself: a Redis pod's restart
        self.redis.start()
        self.note("queue Redis started again")

    def fault_plan(self, duration: float) -> list[tuple[float, Callable[[], None]]]:
        """Faults at random times, one per slot of the run's middle 80 %: replica kills (one per two
        minutes, at least one), a node loss and its replacement half a slot later, a Redis restart."""
        kinds: list[str] = ["kill"] * max(1, round(duration / 120)) + ["node", "redis"]
        self.fault_rng.shuffle(kinds)
        slot = 0.8 * duration / len(kinds)
        plan: list[tuple[float, Callable[[], None]]] = []
        for n, kind in enumerate(kinds):
            at = 0.1 * duration + slot * (n + self.fault_rng.uniform(0.1, 0.4))
            if kind == "node":
                plan += [(at, self.remove_node), (at + slot / 2, self.add_node)]
            else:
                plan.append((at, self.kill_replica if kind == "kill" else self.restart_redis))
        return sorted(plan, key=lambda p: p[0])

    def run_faults(self, plan: list[tuple[float, Callable[[], None]]], start: float) -> None:
        for at, fault in plan:
            time.sleep(max(0.0, start + at - time.monotonic()))  # the plan's own schedule
            fault()

    # The end ------------------------------------------------------------------------------------

    def unfinished(self, timeout_s: float) -> list[str]:
        """The accepted queued requests that do not complete with a result within `timeout_s`."""
        deadline, lost = time.monotonic() + timeout_s, []
        with httpx.Client(base_url=self.local.base, timeout=30) as client:
            for request_id in self.queued:
                while True:
                    try:
                        status = client.get(f"{REQUESTS}/{request_id}/status").json()["status"]
                    except (httpx.TransportError, ValueError):
                        status = "unreachable"
                    if status == "COMPLETED" or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                if status != "COMPLETED" or client.get(f"{REQUESTS}/{request_id}").status_code != 200:
                    lost.append(request_id)
        return lost


def sample_rss(samples: list[dict], every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        samples.append(rss_by_kind())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--load", type=float, default=0.5, help="the fraction of the measured capacity")
    parser.add_argument("--calibrate-s", type=float, default=40)
    parser.add_argument("--calibrate-clients", type=int, default=4)
    parser.add_argument("--sample-every", type=float, default=60)
    parser.add_argument("--redis-down-s", type=float, default=5, help="how long the queue's Redis stays down")
    parser.add_argument("--seed", type=int, default=26)
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    ensure_tiny_model(tmp / "tiny")
    (tmp / "redis").mkdir()
    redis = QueueRedis(tmp / "redis")
    env = tiny_env(tmp / "tiny", tmp, SRPO_REDIS_URL=redis.url, SRPO_QUEUE_CONCURRENCY="8")
    report: dict[str, Any] = {"command": " ".join([".venv/bin/python -m benchmarks.soak", *(argv or sys.argv[1:])]),
                              "seed": opts.seed}
    try:
        with local_cluster(env) as local:
            soak = Soak(local, redis, opts.redis_down_s, opts.seed)
            deploy(local, {"deployment_options": cluster_options(2)})
            capacity = soak.capacity(opts.calibrate_s, opts.calibrate_clients)
            rate = opts.load * capacity
            soak.note(f"capacity {capacity:.2f} requests/s; the load: {rate:.2f}/s for {opts.duration:.0f} s")
            samples, stop, sent = [rss_by_kind()], threading.Event(), []
            start = time.monotonic()
            workers = [threading.Thread(target=lambda: sent.append(soak.load(rate, start + opts.duration))),
                       threading.Thread(target=sample_rss, args=(samples, opts.sample_every, stop))]
            for worker in workers:
                worker.start()
            soak.run_faults(soak.fault_plan(opts.duration), start)  # here: Ray adds nodes from the main thread only
            workers[0].join()
            soak.note(f"load over: {sent[0]} requests sent")
            stop.set()
            workers[1].join()
            lost = soak.unfinished(timeout_s=300)
            soak.note(f"every queued request checked: {len(lost)} of {len(soak.queued)} not completed")
            samples.append(rss_by_kind())
            report |= {
                "capacity_rps": round(capacity, 3), "load_rps": round(rate, 3), "duration_s": opts.duration,
                "outcomes": dict(sorted(soak.outcomes.items())), "queued_accepted": len(soak.queued),
                "queued_lost": lost, "events": soak.events,
                "rss_mib": {kind: {"start": samples[0].get(kind), "end": samples[-1].get(kind),
                                   "peak_rss_mib": max(s[kind]["rss_mib"] for s in samples if kind in s)}
                            for kind in sorted({k for s in samples for k in s})},
            }
    finally:
        redis.process.terminate()
        redis.process.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)  # the tiny model, the outputs, Redis's file
    failed = {k: v for k, v in report["outcomes"].items() if k.startswith("sync") and not k.endswith(" 200")}
    report["failed_sync"] = failed
    text = json.dumps(report, indent=2)
    print(text)
    if opts.out:
        opts.out.write_text(text + "\n")
    return 1 if failed or lost else 0


if __name__ == "__main__":
    sys.exit(main())
