"""Rolling updates under load: redeploy the shipped Serve config twice while sync and queued requests flow.

    /work/slot .venv/bin/python -m benchmarks.rolling_update --duration 75

serve_config.yaml with the tiny preset on one local Ray node (CPU), deployed the way KubeRay
applies `serveConfigV2` (a declarative config to Serve's controller). A steady stream (one
synchronous request at a time in each of `--sync` threads, a queued submission every
`--submit-every` seconds) runs for `--duration` seconds. A third of the way in, a config change
that Serve applies in place (the Ingress's request cap, the Denoiser's downscale delay: no replica
restarts); two thirds in, a code change (the application's runtime_env, as a new build's would:
Serve replaces every replica, starting new ones before stopping old ones gracefully). Reports
non-2xx answers, transport errors, queued requests that did not complete, and whether the
replicas were kept by the first change and all replaced by the second; exits 1 on any fault.
Results: docs/operations.md ("Rolling updates").
"""

from __future__ import annotations

import argparse
import copy
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

from models.tiny import ensure_tiny_model
from tests.harness import (APP_NAME, app_running, config_deployment, deploy_config, free_port, shipped_config,
                           tiny_env, wait_until)

T2I = "fal-ai/flux/srpo"
REQUESTS = "/queue/fal-ai/flux/requests"


def request(i: int) -> dict:
    return {"prompt": f"rolling {i}", "seed": i, "image_size": {"width": 256, "height": 256},
            "num_inference_steps": 4, "enable_safety_checker": False}


def replicas() -> set[str]:
    """The names of the app's replica actors (a restarted replica has a new one)."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")}


def configs(env: dict[str, str]) -> tuple[dict, dict, dict]:
    """The shipped config, the same with an in-place change, and that with a code change."""
    first = shipped_config(env)
    in_place = copy.deepcopy(first)
    config_deployment(in_place, "Ingress")["max_ongoing_requests"] = 48
    config_deployment(in_place, "Denoiser")["autoscaling_config"]["downscale_delay_s"] = 30
    code = copy.deepcopy(in_place)
    code["applications"][0]["runtime_env"]["env_vars"]["SRPO_BUILD"] = "v2"
    return first, in_place, code


def apply(config: dict, timeout_s: float = 300) -> None:
    """Send the config to Serve's controller (as KubeRay does) and wait until the app is RUNNING."""
    deploy_config(config)
    time.sleep(1)  # the controller takes the new target on its next loop
    wait_until(app_running, timeout_s, "the application to be RUNNING")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=75)
    parser.add_argument("--sync", type=int, default=2)
    parser.add_argument("--submit-every", type=float, default=1.0)
    opts = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rolling-"))
    ensure_tiny_model(tmp / "tiny")
    first, in_place, code = configs(tiny_env(tmp / "tiny", tmp, SRPO_QUEUE_CONCURRENCY="4"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    outcomes: Counter[str] = Counter()
    queued: list[str] = []
    stop = threading.Event()
    events: list[tuple[float, str]] = []
    ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(proxy_location=first["proxy_location"], http_options={"host": "127.0.0.1", "port": port})
        apply(first)
        first_replicas = replicas()

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
        began = time.monotonic()
        for thread in threads:
            thread.start()
        kept = None
        for at, label, config in ((1 / 3, "in-place config change", in_place), (2 / 3, "code change", code)):
            time.sleep(max(0.0, began + opts.duration * at - time.monotonic()))
            events.append((round(time.monotonic() - began, 1), f"{label}: sent"))
            apply(config)
            events.append((round(time.monotonic() - began, 1), f"{label}: application RUNNING"))
            kept = replicas() == first_replicas if kept is None else kept
        time.sleep(max(0.0, began + opts.duration - time.monotonic()))
        stop.set()
        for thread in threads:
            thread.join()
        lost = []
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 180
            for request_id in queued:
                while True:
                    status = client.get(f"{REQUESTS}/{request_id}/status").json()["status"]
                    if status == "COMPLETED" or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                if status != "COMPLETED" or client.get(f"{REQUESTS}/{request_id}").status_code != 200:
                    lost.append(request_id)
        wait_replaced = time.monotonic() + 120  # the old replicas stop once they drained
        while replicas() & first_replicas and time.monotonic() < wait_replaced:
            time.sleep(0.5)
        replaced = not (replicas() & first_replicas)
    finally:
        serve.shutdown()
        ray.shutdown()
    bad = {k: v for k, v in outcomes.items() if not k.endswith(" 200")}
    report = {"duration_s": opts.duration, "outcomes": dict(outcomes), "non_2xx_or_errors": bad,
              "queued": len(queued), "queued_lost": len(lost), "events": events,
              "in_place_change_kept_every_replica": kept, "code_change_replaced_every_replica": replaced}
    print(json.dumps(report, indent=2))
    return 1 if bad or lost or not kept or not replaced else 0


if __name__ == "__main__":
    sys.exit(main())
