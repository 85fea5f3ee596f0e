"""The request store's contract, on the embedded SQLite store and on a real redis-server.

Two store objects over the same file / server stand for two ingress replicas.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

import server.queue.store as store_module
from api.queue_schemas import LogEntry
from server.queue.store import (
    CANCELLED_BODY,
    Completion,
    NewRequest,
    RedisRequestStore,
    RequestStore,
    SqliteRequestStore,
)


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path, redis_url):
    stores: list[RequestStore] = []
    if request.param == "redis":
        redis.Redis.from_url(redis_url).flushdb()

    def make(ttl_s: float = 60.0, low_max_wait_s: float = 300.0) -> RequestStore:
        store = (SqliteRequestStore(tmp_path / "requests.sqlite3", ttl_s, low_max_wait_s) if request.param == "sqlite"
                 else RedisRequestStore(redis_url, ttl_s, low_max_wait_s))
        stores.append(store)
        return store

    yield make
    for store in stores:  # Redis connections belong to each test's finished event loop
        if isinstance(store, SqliteRequestStore):
            asyncio.run(store.close())


def _new(**fields) -> NewRequest:
    return NewRequest(id=str(uuid.uuid4()), endpoint="fal-ai/flux/srpo", input={"prompt": "x"},
                      base_url="http://h", **fields)


def run(coro):
    return asyncio.run(coro)


def test_positions_claims_in_order_and_shares_records_between_replicas(make_store):
    async def scenario():
        a, b = make_store(), make_store()
        first, second, third = _new(), _new(), _new()
        assert await a.enqueue(first, 10) == 0
        assert await b.enqueue(second, 10) == 1
        assert await a.enqueue(third, 10) == 2
        assert (await b.get(third.id)).queue_position == 2
        claimed = await b.claim("replica-b", 30)
        assert claimed.id == first.id and claimed.status == "IN_PROGRESS"
        assert (await a.get(third.id)).queue_position == 1
        assert await b.append_logs(first.id, "replica-b", [LogEntry(message="step 1/4"), LogEntry(message="step 2/4")])
        await b.complete(first.id, Completion(code=200, body={"images": []}, inference_time=0.5))
        seen = await a.get(first.id)
        assert seen.status == "COMPLETED" and seen.result == {"images": []} and seen.result_code == 200
        assert [e.message for e in seen.logs] == ["step 1/4", "step 2/4"]
        assert seen.inference_time == 0.5
        assert (await a.claim("replica-a", 30)).id == second.id
        assert await a.get("no-such-id") is None

    run(scenario())


def test_full_queue_enqueues_nothing(make_store):
    async def scenario():
        store = make_store()
        for _ in range(2):
            assert await store.enqueue(_new(), max_pending=2) is not None
        refused = _new()
        assert await store.enqueue(refused, max_pending=2) is None
        assert await store.get(refused.id) is None
        assert await store.pending() == 2

    run(scenario())


def test_cancel_queued_running_completed_and_unknown(make_store):
    async def scenario():
        store = make_store()
        running, queued = _new(), _new()
        await store.enqueue(running, 10)
        await store.enqueue(queued, 10)
        await store.claim("w", 30)
        assert await store.cancel(queued.id) == "removed"
        record = await store.get(queued.id)
        assert record.status == "COMPLETED" and record.result == CANCELLED_BODY and record.error_type == "cancelled"
        assert await store.claim("w", 30) is None  # a cancelled queued request is never run
        assert not await store.cancel_requested(running.id)
        assert await store.cancel(running.id) == "requested"
        assert await store.cancel_requested(running.id)
        await store.complete(running.id, Completion(code=200, body={}))
        assert await store.cancel(running.id) == "completed"
        assert await store.cancel("no-such-id") == "unknown"

    run(scenario())


def test_expired_lease_requeues_at_the_head(make_store):
    async def scenario():
        dead, alive = make_store(), make_store()
        orphan, later = _new(), _new()
        await dead.enqueue(orphan, 10)
        await dead.claim("dead-replica", lease_s=0.2)
        await alive.enqueue(later, 10)
        assert await alive.requeue_expired() == []
        await asyncio.sleep(0.3)
        assert await alive.requeue_expired() == [orphan.id]
        assert (await alive.get(orphan.id)).queue_position == 0
        assert not await dead.renew(orphan.id, "dead-replica", 30)  # its old owner lost it
        claimed = await alive.claim("alive-replica", 30)
        assert claimed.id == orphan.id and claimed.attempts == 2  # every claim counts as an attempt
        assert await alive.renew(orphan.id, "alive-replica", 30)

        # The late worker wakes up: it can neither log nor overwrite the result, so no second webhook.
        late = Completion(code=500, body={"detail": "late"})
        assert not await dead.append_logs(orphan.id, "dead-replica", [LogEntry(message="late")])
        assert not await dead.complete(orphan.id, late, worker="dead-replica")
        assert await alive.append_logs(orphan.id, "alive-replica", [LogEntry(message="step 1/1")])
        assert await alive.complete(orphan.id, Completion(code=200, body={"ok": 1}), worker="alive-replica")
        assert not await dead.complete(orphan.id, late, worker="dead-replica")
        record = await alive.get(orphan.id)
        assert (record.result, [e.message for e in record.logs]) == ({"ok": 1}, ["step 1/1"])

    run(scenario())


def test_a_stopping_replica_hands_its_requests_back_at_once(make_store):
    async def scenario():
        stopping, other = make_store(), make_store()
        first, second = _new(), _new()
        await stopping.enqueue(first, 10)
        await stopping.enqueue(second, 10)
        assert (await stopping.claim("stopping", 30)).id == first.id
        assert not await other.release(first.id, "other")  # only its holder hands it back
        assert await stopping.release(first.id, "stopping")
        assert not await stopping.release(first.id, "stopping")
        record = await other.get(first.id)
        assert (record.status, record.queue_position) == ("IN_QUEUE", 0)  # ahead of the later request
        assert (await other.claim("other", 30)).id == first.id  # no lease had to run out

    run(scenario())


def test_finished_records_expire(make_store):
    async def scenario():
        store = make_store(ttl_s=1)
        done, waiting = _new(), _new()
        await store.enqueue(done, 10)
        await store.claim("w", 30)
        await store.complete(done.id, Completion(code=200, body={}))
        await store.enqueue(waiting, 10)
        assert await store.get(done.id) is not None
        deadline = time.monotonic() + 5
        while await store.get(done.id) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await store.requeue_expired()  # the embedded store purges in its sweep
        assert await store.get(done.id) is None
        assert (await store.get(waiting.id)).status == "IN_QUEUE"  # unfinished work never expires

    run(scenario())


def test_low_priority_waits_for_normal_requests_but_never_starves(make_store):
    async def scenario():
        store = make_store(low_max_wait_s=1.0)
        low_1, low_2 = _new(priority="low"), _new(priority="low")
        normal_1, normal_2 = _new(), _new()
        positions = [await store.enqueue(r, 10) for r in (low_1, low_2, normal_1, normal_2)]
        assert positions == [0, 1, 0, 1]  # a normal request is ahead of every low one
        assert [(await store.get(r.id)).queue_position for r in (low_1, low_2, normal_1, normal_2)] == [2, 3, 0, 1]
        ids = [r.id for r in (low_1, low_2, normal_1, normal_2)]
        assert await store.positions(ids + ["no-such-id"]) == dict(zip(ids, [2, 3, 0, 1]))  # one read for all
        assert (await store.claim("w", 30)).id == normal_1.id
        assert await store.positions(ids) == dict(zip(ids[:2] + ids[3:], [1, 2, 0]))  # claimed: no longer waits
        await asyncio.sleep(1.1)  # low_1 and low_2 have now waited past the bound
        late_normal = _new()
        await store.enqueue(late_normal, 10)
        # The starved low requests go before normal ones submitted after them, in submit order.
        claimed = [(await store.claim("w", 30)).id for _ in range(4)]
        assert claimed == [low_1.id, low_2.id, normal_2.id, late_normal.id]
        assert await store.pending() == 0

    run(scenario())


REPLICAS = 6


def _at_once(work) -> list:
    """`work(i)` for each of REPLICAS replicas, in threads released together, each with its own event loop
    (as replicas are), the results in replica order."""
    gate = threading.Barrier(REPLICAS)

    def replica(i: int):
        gate.wait(timeout=30)
        return asyncio.run(work(i))

    with ThreadPoolExecutor(REPLICAS) as pool:
        return list(pool.map(replica, range(REPLICAS)))


def test_concurrent_claims_take_each_request_exactly_once(make_store):
    first = make_store()
    requests = [_new() for _ in range(60)]
    stores = [make_store() for _ in range(REPLICAS)]

    async def enqueue_all() -> None:
        for request in requests:
            assert await first.enqueue(request, 100) is not None

    run(enqueue_all())

    async def drain(i: int) -> list[str]:
        claimed = []
        try:
            while (record := await stores[i].claim(f"replica-{i}", 60)) is not None:
                assert record.status == "IN_PROGRESS" and record.attempts == 1, record
                claimed.append(record.id)
        finally:
            await stores[i].close()
        return claimed

    claimed = [request_id for replica in _at_once(drain) for request_id in replica]
    assert sorted(claimed) == sorted(r.id for r in requests)  # none twice, none left behind


def test_concurrent_enqueues_fill_the_queue_exactly_to_its_limit(make_store):
    stores = [make_store() for _ in range(REPLICAS)]

    async def submit(i: int) -> list[bool]:
        try:
            return [await stores[i].enqueue(_new(), max_pending=25) is not None for _ in range(10)]
        finally:
            await stores[i].close()

    accepted = sum(ok for replica in _at_once(submit) for ok in replica)
    assert accepted == 25
    assert run(make_store().pending()) == 25


def test_a_sqlite_status_read_never_waits_for_a_write_of_its_own_process(tmp_path):
    """A write waiting for the database (another replica holds its write lock) keeps the writing
    connection; status reads, positions included, go on meanwhile (issue 25: they queued behind it)."""

    async def scenario():
        store = SqliteRequestStore(tmp_path / "requests.sqlite3", 60.0)
        waiting = [_new(), _new()]
        for request in waiting:
            await store.enqueue(request, 100)
        other = sqlite3.connect(tmp_path / "requests.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another replica's write under way
        write = asyncio.ensure_future(store.enqueue(_new(), 100))
        for _ in range(500):  # until the write holds the writing connection, on its thread
            if store._lock.locked():
                break
            await asyncio.sleep(0.01)
        assert store._lock.locked() and not write.done()
        record = await asyncio.wait_for(store.get(waiting[1].id, logs=False), 2)
        assert record.queue_position == 1
        assert await asyncio.wait_for(store.positions([waiting[0].id]), 2) == {waiting[0].id: 0}
        other.execute("COMMIT")
        assert await write == 2
        other.close()
        await store.close()

    run(scenario())


def test_sqlite_positions_follow_another_process_moves_even_past_the_kept_log(tmp_path, monkeypatch):
    """Positions in one process stay exact while another enqueues, claims, hands back, cancels and
    deletes; also when the queue log was trimmed past what this process had applied (it rebuilds)."""
    monkeypatch.setattr(store_module, "QUEUE_LOG_KEPT", 5)
    path = tmp_path / "requests.sqlite3"
    here, there = SqliteRequestStore(path, 60), SqliteRequestStore(path, 60)
    truth = sqlite3.connect(path)

    def expected() -> dict[str, int]:  # the definition: normal lane first, each lane in submit order
        rows = truth.execute("SELECT id FROM requests WHERE status='IN_QUEUE' ORDER BY low, seq").fetchall()
        return {request_id: position for position, (request_id,) in enumerate(rows)}

    async def scenario():
        requests = [_new(priority="low" if i % 3 == 0 else "normal") for i in range(12)]
        for request in requests[:8]:
            await there.enqueue(request, 100)
        ids = [r.id for r in requests]
        assert await here.positions(ids) == expected()
        await there.cancel(requests[4].id)  # fewer moves than the log keeps: applied from the log
        claimed = await there.claim("w", 0)
        assert await here.positions(ids) == expected()
        assert truth.execute("SELECT COUNT(*) FROM queue_log").fetchone()[0] <= 5
        await there.requeue_expired()  # the claimed request goes back to its place
        for request in requests[8:]:
            await there.enqueue(request, 100)
        await there.delete(requests[6].id)
        await there.cancel(requests[10].id)
        assert await here.positions(ids) == expected() != {}  # more moves than the log keeps
        assert claimed.id in expected()

    try:
        run(scenario())
    finally:
        truth.close()
        run(here.close())
        run(there.close())


DEEP = 3000


async def _fill(store: RequestStore, count: int) -> list[NewRequest]:
    requests = [_new() for _ in range(count)]
    for request in requests:
        assert await store.enqueue(request, 10 * DEEP) is not None
    return requests


def _sqlite_work(store: SqliteRequestStore):
    """A counter of the SQLite virtual machine's steps on the store's connection (its work)."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    store._db.set_progress_handler(count, 50)  # noqa: SLF001: the only handle on the engine's work
    return steps


def test_a_deep_queue_costs_a_status_read_what_a_shallow_one_does(make_store, request):
    """Submit, status (with logs), cancel, claim and the expiry sweep at 3000 waiting cost what they
    cost at 1: no count of the queue per read (SQLite: engine steps; Redis: only O(log n) commands),
    positions stay exact."""

    async def scenario():
        store = make_store()
        redis_client = (None if isinstance(store, SqliteRequestStore)
                        else redis.Redis.from_url(request.getfixturevalue("redis_url")))

        async def cost(op) -> int | set[str]:
            if redis_client is None:
                steps = _sqlite_work(store)
                await op()
                return steps[0]
            before = redis_client.info("commandstats")
            await op()
            after = redis_client.info("commandstats")
            return {name for name, stats in after.items() if stats["calls"] != before.get(name, {}).get("calls")}

        async def read_last(requests):  # the first read after the queue moved (a cancel ahead)
            await store.get(requests[-1].id)  # a process's first read builds its positions (SQLite)
            await store.cancel(requests[-2].id)
            return await cost(lambda: store.get(requests[-1].id))

        shallow = await _fill(store, 2)
        costs = {"status": [await read_last(shallow)], "submit": [await cost(lambda: _fill(store, 1))]}
        await store.cancel(shallow[-1].id)
        costs["claim"] = [await cost(lambda: store.claim("w", 30))]
        costs["sweep"] = [await cost(store.requeue_expired)]
        deep = await _fill(store, DEEP)
        costs["status"].append(await read_last(deep))  # cancels deep[-2]
        costs["submit"].append(await cost(lambda: _fill(store, 1)))
        costs["cancel"] = [await cost(lambda: store.cancel(deep[1].id)), await cost(lambda: store.cancel(deep[-3].id))]
        costs["claim"].append(await cost(lambda: store.claim("w", 30)))  # takes deep[0]
        costs["sweep"].append(await cost(store.requeue_expired))
        if redis_client is None:
            for name, (at_1, at_deep) in costs.items():
                assert at_deep <= 2 * at_1 + 5, (name, costs)
        else:
            # No LPOS or LREM (a scan of the queue): every command here is O(1) or O(log n).
            cheap = {f"cmdstat_{name}" for name in ("hgetall", "hget", "hmget", "hset", "zrank", "zcard", "zadd",
                                                    "zrem", "incr", "zrange", "zpopmin", "hincrby", "script|load",
                                                    "zrangebyscore", "expire", "publish", "multi", "exec", "evalsha",
                                                    "lrange", "ping", "info")}
            for name, seen in costs.items():
                assert set().union(*seen) <= cheap, (name, seen)
            redis_client.close()
        # Exact positions right after moves in the middle and at the head.
        expected = DEEP - 5  # ahead of deep[-1]: the rest of `deep` less deep[0] (claimed), deep[1], deep[-3], deep[-2]
        assert (await store.get(deep[-1].id)).queue_position == expected

    run(scenario())


def test_status_reads_asked_together_each_get_their_own_record(make_store, request):
    """Reads of the same turn (a burst of status polls) answer each reader with its own record: the
    right status and position, None for an unknown id, a copy per reader of the same id. On Redis they
    are one call."""

    async def scenario():
        store = make_store()
        waiting = await _fill(store, 3)
        await store.cancel(waiting[0].id)
        ids = [waiting[2].id, waiting[0].id, "unknown", waiting[1].id, waiting[2].id]
        calls = None
        if isinstance(store, RedisRequestStore):
            await store.get(waiting[1].id, logs=False)  # the script is loaded
            redis_client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
            calls = redis_client.info("commandstats")["cmdstat_evalsha"]["calls"]
        records = await asyncio.gather(*(store.get(i, logs=False) for i in ids))
        if calls is not None:
            assert redis_client.info("commandstats")["cmdstat_evalsha"]["calls"] == calls + 1
            redis_client.close()
        last, cancelled, unknown, second, last_again = records
        assert (last.status, last.queue_position, second.queue_position) == ("IN_QUEUE", 1, 0)
        assert cancelled.status == "COMPLETED" and unknown is None
        assert last_again == last and last_again is not last

    run(scenario())


def test_redis_reads_asked_while_one_is_in_flight_go_together_next(redis_url):
    """Under load a status read arrives every few hundred microseconds: those asked while a read is
    on its way to Redis (over several turns of the event loop) go as one call after it, not one each."""

    async def scenario():
        store = RedisRequestStore(redis_url, 60)
        waiting = await _fill(store, 6)
        real, batches, gate = store._scripts["get_many"], [], asyncio.Event()

        async def held_at_the_gate(*args, **kwargs):  # the real script, once the gate opens
            batches.append(kwargs["args"])
            await gate.wait()
            return await real(*args, **kwargs)

        store._scripts["get_many"] = held_at_the_gate
        first = asyncio.ensure_future(store.get(waiting[5].id, logs=False))
        while not batches:
            await asyncio.sleep(0)
        later = []
        for request in waiting[:5]:  # one per turn of the event loop
            later.append(asyncio.ensure_future(store.get(request.id, logs=False)))
            await asyncio.sleep(0)
        gate.set()
        records = await asyncio.wait_for(asyncio.gather(first, *later), 10)
        assert batches == [[waiting[5].id], [request.id for request in waiting[:5]]]
        assert [record.queue_position for record in records] == [5, 0, 1, 2, 3, 4]
        await store.close()

    redis.Redis.from_url(redis_url).flushdb()
    run(scenario())


def test_logs_are_read_from_an_offset(make_store):
    async def scenario():
        store = make_store()
        running = _new()
        await store.enqueue(running, 10)
        await store.claim("w", 30)
        for i in range(3):
            assert await store.append_logs(running.id, "w", [LogEntry(message=f"step {i}")])
        assert [e.message for e in await store.logs_from(running.id, 1)] == ["step 1", "step 2"]
        assert await store.logs_from(running.id, 3) == []
        assert (await store.get(running.id, logs=False)).logs == []

    run(scenario())


def test_a_change_by_another_replica_wakes_a_waiter(make_store):
    """Status holds and streams wake on the store's notifications: one replica waits, another claims,
    logs and completes (Redis: pub/sub; SQLite: another connection's commits)."""

    async def scenario():
        waiting_side, working_side = make_store(), make_store()
        first, second = _new(), _new()
        await working_side.enqueue(first, 10)
        await working_side.enqueue(second, 10)
        with waiting_side.watch(second.id) as moved, waiting_side.watch(first.id) as own:
            own.follow_queue(False)
            await working_side.claim("w", 30)
            assert await moved.next(10) is not None
            assert await own.next(10) is not None
        with waiting_side.watch(second.id) as unrelated:
            unrelated.follow_queue(False)
            assert await unrelated.next(0.5) is None  # nothing happened to it, and it does not follow queue moves

    run(scenario())


def test_requests_waiting_in_an_earlier_versions_redis_lists_are_kept_in_order(redis_url):
    """An upgrade finds the queue as plain lists (before sorted sets): nothing waiting is lost."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    waiting = [_new(), _new(), _new(priority="low")]
    for request in waiting:  # what the earlier version's enqueue wrote
        client.hset(f"srpo:queue:r:{request.id}", mapping={
            "request": request.model_dump_json(), "status": "IN_QUEUE", "priority": request.priority,
            "created": request.created_at})
        client.rpush("srpo:queue:pending" + (":low" if request.priority == "low" else ""), request.id)
    client.close()

    async def scenario():
        store = RedisRequestStore(redis_url, 60)
        assert [(await store.claim("w", 30)).id for _ in waiting] == [r.id for r in waiting]
        await store.close()

    run(scenario())
