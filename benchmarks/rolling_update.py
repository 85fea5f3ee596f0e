"""Rolling updates under load: redeploy the app twice while synchronous and queued requests flow.

    /work/slot .venv/bin/python -m benchmarks.rolling_update --duration 75

The tiny preset on one local Ray node (CPU). A steady stream (one synchronous request at a time in
each of `--sync` threads, and a queued submission every `--submit-every` seconds) runs for
`--duration` seconds; a third of the way in the application is redeployed with a changed config
(the Ingress's request cap and the TextEncoder's batch wait: Serve starts new replicas of the
changed deployments and stops the old ones gracefully), two thirds in with a new code version of
every deployment (`version`, as a new image would). It reports non-2xx answers, transport errors
and queued requests that did not complete, and which version serves at the end; exits 1 if any.
Results: docs/operations.md ("Rolling updates").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import ray
from ray import serve

from deployments.app import build_app
from models.tiny import ensure_tiny_model
from tests.harness import APP_NAME, running_serve, tiny_env

T2I = "fal-ai/flux/srpo"
REQUESTS = "/queue/fal-ai/flux/requests"
STAGES = ("Ingress", "TextEncoder", "Denoiser", "Decoder")


def request(i: int) -> dict:
    return {"prompt": f"rolling {i}", "seed": i, "image_size": {"width": 256, "height": 256},
            "num_inference_steps": 4, "enable_safety_checker": False}


def replicas() -> set[str]:
    """The names of the app's replica actors (a new code version replaces every one)."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")}


def args_for(version: str | None, changed: bool) -> dict:
    options: dict[str, dict] = {name: {} for name in STAGES}
    if changed:
        options["Ingress"]["max_ongoing_requests"] = 48
        options["TextEncoder"]["max_ongoing_requests"] = 24
    if version:
        for name in STAGES:
            options[name]["version"] = version
    return {"deployment_options": options}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=75)
    parser.add_argument("--sync", type=int, default=2)
    parser.add_argument("--submit-every", type=float, default=1.0)
    opts = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rolling-"))
    tiny = tmp / "tiny"
    ensure_tiny_model(tiny)
    outcomes: Counter[str] = Counter()
    queued: list[str] = []
    stop = threading.Event()
    events: list[tuple[float, str]] = []
    with running_serve(tiny_env(tiny, tmp, SRPO_QUEUE_CONCURRENCY="4"), args_for("v1", False)) as base:
        began, first_replicas = time.monotonic(), replicas()

        def sync_loop(worker: int) -> None:
            with httpx.Client(base_url=base, timeout=120) as client:
                i = worker * 100000
                while not stop.is_set():
                    i += 1
                    try:
                        outcomes[f"sync {client.post(f'/{T2I}', json=request(i)).status_code}"] += 1
                    except httpx.TransportError as exc:
                        outcomes[f"sync {type(exc).__name__}"] += 1

        def submit_loop() -> None:
            with httpx.Client(base_url=base, timeout=60) as client:
                i = 900000
                while not stop.is_set():
                    i += 1
                    try:
                        response = client.post(f"/queue/{T2I}", json=request(i))
                        outcomes[f"submit {response.status_code}"] += 1
                        if response.status_code == 200:
                            queued.append(response.json()["request_id"])
                    except httpx.TransportError as exc:
                        outcomes[f"submit {type(exc).__name__}"] += 1
                    stop.wait(opts.submit_every)

        threads = [threading.Thread(target=sync_loop, args=(w,)) for w in range(opts.sync)]
        threads.append(threading.Thread(target=submit_loop))
        for thread in threads:
            thread.start()
        for at, label, args in ((1 / 3, "config change", args_for("v1", True)),
                                (2 / 3, "code version v2", args_for("v2", True))):
            time.sleep(max(0.0, began + opts.duration * at - time.monotonic()))
            events.append((time.monotonic() - began, f"{label}: redeploy sent"))
            serve.run(build_app(args), name=APP_NAME, route_prefix="/")
            events.append((time.monotonic() - began, f"{label}: application RUNNING"))
        time.sleep(max(0.0, began + opts.duration - time.monotonic()))
        stop.set()
        for thread in threads:
            thread.join()
        lost = []
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 180
            for request_id in queued:
                while True:
                    body = client.get(f"{REQUESTS}/{request_id}/status").json()
                    if body["status"] == "COMPLETED" or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                if body["status"] != "COMPLETED" or client.get(f"{REQUESTS}/{request_id}").status_code != 200:
                    lost.append(request_id)
        app = serve.status().applications[APP_NAME]
        replaced = not (replicas() & first_replicas)
    bad = {k: v for k, v in outcomes.items() if not k.endswith(" 200")}
    report = {"duration_s": opts.duration, "outcomes": dict(outcomes), "non_2xx_or_errors": bad,
              "queued": len(queued), "queued_lost": len(lost), "events": events, "app_status": str(app.status),
              "every_replica_replaced": replaced}
    print(json.dumps(report, indent=2))
    return 1 if bad or lost or not replaced else 0


if __name__ == "__main__":
    sys.exit(main())
