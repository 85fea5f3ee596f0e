"""Long-polled status reads through the real HTTP app and request store (SQLite and Redis): an ask
repeated soon with nothing changed is held until another replica changes the request or the
queue, and answers with the change; an ask on its own is answered at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import redis

from api.queue_schemas import LogEntry
from server.app import build_app
from server.queue.store import RedisRequestStore, RequestStore, SqliteRequestStore
from server.service import SRPOService
from settings import Settings, get_settings

REQUESTS = "/queue/fal-ai/flux/requests"
BODY = {"prompt": "a red fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
HOLD_S = 30.0  # far longer than any wait below: an answer before a change is not the bound passing


class AllBusy:
    """A backend whose Denoisers are all busy: this replica claims nothing, requests stay queued."""

    async def generate(self, *args, **kwargs):
        raise AssertionError("nothing may run here")

    def is_transient(self, exc: BaseException) -> bool:
        return False

    def has_room(self) -> bool:
        return False


@pytest.fixture(params=["sqlite", "redis"])
def stores(request, tmp_path: Path) -> tuple[Settings, callable]:
    settings = get_settings().model_copy(update={
        "storage_dir": tmp_path / "files", "queue_db_path": tmp_path / "requests.sqlite3",
        "queue_status_hold_s": HOLD_S})
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushdb()
        return settings, lambda: RedisRequestStore(url, settings.result_ttl_s)
    return settings, lambda: SqliteRequestStore(settings.queue_db_path, settings.result_ttl_s)


async def _held(store: RequestStore, ask: asyncio.Task, request_id: str) -> None:
    """Wait until `ask` is held on the request (bounded)."""
    for _ in range(400):
        if store.changes.watched(request_id):
            return
        assert not ask.done(), f"answered at once: {ask.result().json()}"
        await asyncio.sleep(0.025)
    raise AssertionError("the repeated ask was never held")


def test_a_repeated_ask_is_held_until_the_request_or_its_position_changes(stores):
    settings, make_store = stores

    async def scenario():
        store, other_replica = make_store(), make_store()
        app = build_app(SRPOService(AllBusy(), settings), store=store)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=60) as client:
            first, second = [(await client.post("/queue/fal-ai/flux/srpo", json=BODY)).json()["request_id"]
                             for _ in range(2)]
            status = f"{REQUESTS}/{second}/status"
            answer = await asyncio.wait_for(client.get(status), 10)  # on its own: at once
            assert (answer.status_code, answer.json()["queue_position"]) == (202, 1)

            held = asyncio.ensure_future(client.get(status))
            await _held(store, held, second)
            assert (await other_replica.claim("w", 30)).id == first  # another replica starts `first`
            answer = await asyncio.wait_for(held, 10)
            assert (answer.status_code, answer.json()["queue_position"]) == (202, 0)

            running = f"{REQUESTS}/{first}/status?logs=1"
            assert (await client.get(running)).json()["logs"] == []
            held = asyncio.ensure_future(client.get(running))
            await _held(store, held, first)
            assert await other_replica.append_logs(first, "w", [LogEntry(message="step 1/2")])
            answer = await asyncio.wait_for(held, 10)
            assert [e["message"] for e in answer.json()["logs"]] == ["step 1/2"]

            assert (await client.put(f"{REQUESTS}/{second}/cancel")).status_code == 202
            answer = await asyncio.wait_for(client.get(status), 10)  # changed since the last answer: at once
            assert (answer.status_code, answer.json()["status"]) == (200, "COMPLETED")
            answer = await asyncio.wait_for(client.get(status), 10)  # completed: never held
            assert answer.status_code == 200
        await other_replica.close()
        await store.close()

    asyncio.run(scenario())


def test_a_change_between_the_read_and_the_hold_still_ends_the_hold(stores):
    """A repeated ask reads the request, then holds: a queue move that lands in between (on Redis a read's
    answer and a notification published after it can reach the replica in either order) ends the hold
    at once, not the hold's bound."""
    settings, make_store = stores

    async def scenario():
        store, other_replica = make_store(), make_store()
        app = build_app(SRPOService(AllBusy(), settings), store=store)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=60) as client:
            first, second, third = [(await client.post("/queue/fal-ai/flux/srpo", json=BODY)).json()["request_id"]
                                    for _ in range(3)]
            status = f"{REQUESTS}/{second}/status"
            assert (await client.get(status)).json()["queue_position"] == 1

            notified = asyncio.Event()
            for name in ("moved", "everything"):  # a notification reached this replica
                def seen(*args, _real=getattr(store.changes, name)):
                    _real(*args)
                    notified.set()
                setattr(store.changes, name, seen)
            await other_replica.cancel(third)  # the replica follows notifications from here on
            await asyncio.wait_for(notified.wait(), 10)

            real_get, claimed = store.get, []

            async def read_then_claim(request_id: str, logs: bool = True):
                record = await real_get(request_id, logs)
                if request_id == second and not claimed:  # the ask has read position 1
                    notified.clear()
                    claimed.append(await other_replica.claim("w", 30))
                    await asyncio.wait_for(notified.wait(), 10)  # its notification is here before the hold
                return record

            store.get = read_then_claim
            answer = await asyncio.wait_for(client.get(status), 10)
            assert claimed[0].id == first
            assert (answer.status_code, answer.json()["queue_position"]) == (202, 0)
        await other_replica.close()
        await store.close()

    asyncio.run(scenario())


def test_a_queue_move_refreshes_every_held_ask_with_one_position_read(stores):
    """Hundreds of waiting clients are woken by every claim: their held asks share a batched position
    read instead of one store read each."""
    settings, make_store = stores
    holders = 20

    async def scenario():
        store, other_replica = make_store(), make_store()
        app = build_app(SRPOService(AllBusy(), settings), store=store)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=60) as client:
            ids = [(await client.post("/queue/fal-ai/flux/srpo", json=BODY)).json()["request_id"]
                   for _ in range(holders + 1)]
            waiting = ids[1:]
            for request_id in waiting:  # asked once: the next ask of each is a repeat, held
                assert (await client.get(f"{REQUESTS}/{request_id}/status")).status_code == 202
            held = [asyncio.ensure_future(client.get(f"{REQUESTS}/{request_id}/status")) for request_id in waiting]
            for ask, request_id in zip(held, waiting):
                await _held(store, ask, request_id)
            reads = {"get": 0, "positions": 0}
            for name in reads:
                def counted(*args, _real=getattr(store, name), _name=name, **kwargs):
                    reads[_name] += 1
                    return _real(*args, **kwargs)
                setattr(store, name, counted)
            assert (await other_replica.claim("w", 30)).id == ids[0]
            answers = await asyncio.wait_for(asyncio.gather(*held), 10)
            assert [a.json()["queue_position"] for a in answers] == list(range(holders))  # each moved up one
            assert reads["get"] == 0 and 1 <= reads["positions"] <= holders // 4, reads
        await other_replica.close()
        await store.close()

    asyncio.run(scenario())
