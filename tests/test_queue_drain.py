"""A stopped Ingress replica drains its queued work (real Serve, tiny model, the shipped config applied
the way KubeRay applies `serveConfigV2`). A rolling update replaces the Ingress replica while it runs two
queued requests: the one that can finish within `SRPO_QUEUE_DRAIN_S` finishes there, the one that cannot
goes back to the head of the queue and the new replica runs it; nothing is lost, nothing runs twice.

Gates (tests/gate.py) hold each image-to-image request at its source fetch, so which replica runs what,
and when, is the test's choice rather than a matter of timing. While the old replica drains, no Ingress
may be reachable over HTTP (the new one can still be starting): the drain's own steps are read from the
shared store itself, and every bound comes from the shipped config and this test's settings.
"""

from __future__ import annotations

import asyncio
import copy
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from server.queue.store import RequestRecord, SqliteRequestStore
from settings import Settings
from tests.gate import gate_server
from tests.harness import config_deployment, deploy_config, running_serve, shipped_config, tiny_env, wait_until
from tests.queue_helpers import APP, REQUESTS, denoised_samples, small, step_logs, wait_status

I2I = f"{APP}/image-to-image"
# The shipped drain; the released request's whole run (fetch, encode, 5 steps, decode at 64x64) fits many times over.
DRAIN_S = Settings.model_fields["queue_drain_s"].default
LEASE_S = 300.0  # longer than the test: only the hand-back brings a request back
CONTROLLER_S = 60.0  # for Serve's controller to act on a new config on a loaded machine


@pytest.fixture(scope="module")
def server(tiny_root, tmp_path_factory) -> Iterator[tuple[str, dict, SqliteRequestStore]]:
    env = tiny_env(
        tiny_root, tmp_path_factory.mktemp("drain"),
        SRPO_QUEUE_CONCURRENCY="2",  # each Ingress replica runs two queued requests; the rest wait in the store
        SRPO_QUEUE_LEASE_S=str(LEASE_S),
        SRPO_IMAGE_URL_ALLOWED_NETWORKS='["127.0.0.1/32"]',  # the gates
        SRPO_IMAGE_FETCH_TIMEOUT_S=str(LEASE_S),
    )
    config = shipped_config(env)
    with running_serve(env, config=config) as base:
        store = SqliteRequestStore(Path(env["SRPO_QUEUE_DB_PATH"]), ttl_s=3600)  # the test only reads it
        yield base, config, store
        asyncio.run(store.close())


def stored(store: SqliteRequestStore, request_id: str) -> RequestRecord:
    record = asyncio.run(store.get(request_id))
    assert record is not None, request_id
    return record


def said(record: RequestRecord, text: str) -> bool:
    return any(text in entry.message for entry in record.logs or [])


def messages(body: dict) -> list[str]:
    return [entry["message"] for entry in body.get("logs") or []]


def test_a_stopped_ingress_finishes_what_it_can_and_hands_the_rest_to_the_head_of_the_queue(server):
    base, config, store = server
    grace_s = config_deployment(config, "Ingress")["graceful_shutdown_timeout_s"]
    # Serve stops the replica after its HTTP requests drain; the queue drain and the hand-back must fit too.
    assert grace_s > DRAIN_S
    with ExitStack() as stack, httpx.Client(base_url=base, timeout=30) as client:
        short, long, first, second = (stack.enter_context(gate_server()) for _ in range(4))

        def submit(path: str, body: dict) -> str:
            response = client.post(f"/queue/{path}", json=body)
            assert response.status_code == 200, response.text
            return response.json()["request_id"]

        before = denoised_samples()
        a, b = submit(I2I, short.held_body(seed=1)), submit(I2I, long.held_body(seed=2))
        wait_until(lambda: short.hits and long.hits, 60, "the replica to run both held requests")
        # Submitted after b, waiting: c and e fill the next replica's two slots, d shows who goes first.
        c, e, d = submit(I2I, first.held_body(seed=3)), submit(I2I, second.held_body(seed=4)), submit(APP, small(seed=5))
        assert [stored(store, r).queue_position for r in (c, e, d)] == [0, 1, 2]

        rolled = copy.deepcopy(config)
        config_deployment(rolled, "Ingress")["ray_actor_options"] = {"num_cpus": 0.2}  # Serve replaces the replica
        deploy_config(rolled)

        # The stopping replica tells its running requests; a's run then goes on to the end there, within
        # the drain.
        wait_until(lambda: said(stored(store, a), "replica is stopping"), CONTROLLER_S + grace_s, "the old replica to tell its requests it is stopping")
        short.open()
        wait_until(lambda: stored(store, a).status == "COMPLETED", grace_s, "a to finish")
        assert len(short.hits) == 1 and not said(stored(store, a), "Restarted")  # it ran once, on the stopping replica

        # b cannot finish (its gate stays shut): after the drain it is handed back, ahead of c, e and d,
        # long before its lease would have run out.
        wait_until(lambda: stored(store, b).attempts == 2 or stored(store, b).status == "IN_QUEUE", grace_s,
                   "the stopping replica to hand b back")
        if stored(store, b).status == "IN_QUEUE":
            assert stored(store, b).queue_position == 0
        wait_until(lambda: len(long.hits) == 2 or (first.hits and second.hits), CONTROLLER_S + grace_s,
                   "the new replica to take work")
        if len(long.hits) == 1:  # the new replica took c and e first: b waits for a slot, at the head
            assert (stored(store, b).queue_position, stored(store, d).queue_position) == (0, 1)
            first.open()  # c finishes: one slot, for whichever request is at the head
            wait_until(lambda: len(long.hits) == 2 or stored(store, d).status != "IN_QUEUE", 60,
                       "the new replica to take the next request")
        assert len(long.hits) == 2 and stored(store, d).status == "IN_QUEUE"  # b went before d

        for gate in (long, first, second):
            gate.open()
        finished = {r: wait_status(client, r, lambda s: s["status"] == "COMPLETED", timeout_s=120)
                    for r in (a, b, c, e, d)}
        for request_id, body in finished.items():
            assert "error" not in body, body
            assert client.get(f"{REQUESTS}/{request_id}").status_code == 200
            steps = step_logs(body)  # each step once: no request was denoised twice
            total = int(steps[-1].split("/")[1])
            assert steps == [f"step {i}/{total}" for i in range(1, total + 1)], steps
        assert any("Restarted (attempt 2)" in m for m in messages(finished[b])), messages(finished[b])
        assert len(long.hits) == 2 and len(short.hits) == 1
        assert denoised_samples() - before == sum(int(step_logs(body)[-1].split("/")[1]) for body in finished.values())
