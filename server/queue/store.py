"""Queue records shared by every ingress replica: an embedded SQLite file or Redis.

A record holds a queued request from submit to expiry: its input, status, logs and result (an
input or result larger than `payload_inline_max_bytes` lives in object storage and the record
holds its name, so records and status polls stay small). The
pending queue lives in the store too, so a request accepted by one replica can be run by any
other. A running request holds a lease its replica renews; when a replica dies, the lease runs
out and the request goes back to the head of the queue (`requeue_expired`), so nothing accepted
is lost. Every transition is one atomic operation (a SQLite write transaction, a Redis Lua
script), so replicas never claim the same request twice and a full queue enqueues nothing.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from api.queue_schemas import LogEntry, QueueState
from settings import Settings

CancelOutcome = Literal["removed", "requested", "completed", "unknown"]
Priority = Literal["normal", "low"]

CANCELLED_BODY = {"detail": "Request was cancelled", "error_type": "cancelled"}
CANCELLED_CODE = 400


class NewRequest(BaseModel):
    """What submit stores: enough for any replica to run the request and build its URLs."""

    id: str
    endpoint: str
    input: dict[str, Any] | None  # None when the input is stored as a payload (input_ref)
    input_ref: str | None = None
    sync_mode: bool = False
    output_ttl_s: float | None = None  # x-fal-object-lifecycle-preference
    start_timeout_s: float | None = None  # X-Fal-Request-Timeout: how long it may wait before it starts
    retry: bool = True  # False with x-fal-no-retry
    priority: Priority = "normal"  # X-Fal-Queue-Priority
    base_url: str
    webhook_url: str | None = None
    created_at: float = Field(default_factory=time.time)


class RequestRecord(NewRequest):
    status: QueueState = "IN_QUEUE"
    attempts: int = 0  # claims so far, this one included
    queue_position: int | None = None  # IN_QUEUE only: requests ahead of this one
    logs: list[LogEntry] = Field(default_factory=list)
    result_code: int | None = None
    result: Any = None
    result_ref: str | None = None  # the result body's payload name, when it is not inline
    result_headers: dict[str, str] | None = None
    error: str | None = None
    error_type: str | None = None
    inference_time: float | None = None

    def set_completion(self, done: Completion) -> None:
        self.result_code, self.result, self.result_ref = done.code, done.body, done.body_ref
        self.result_headers = done.headers
        self.error, self.error_type, self.inference_time = done.error, done.error_type, done.inference_time

    def payload_refs(self) -> list[str]:
        return [ref for ref in (self.input_ref, self.result_ref) if ref]


class Completion(BaseModel):
    """How a request ended: the result route's status code and body, plus status-body fields."""

    code: int
    body: Any = None
    body_ref: str | None = None  # the body's payload name, when it is not inline
    error: str | None = None
    error_type: str | None = None
    inference_time: float | None = None
    headers: dict[str, str] | None = None  # extra headers of the result route's response


CANCELLED = Completion(code=CANCELLED_CODE, body=CANCELLED_BODY, error="Request was cancelled", error_type="cancelled")


class RequestStore(ABC):
    """Priorities: a low-priority request starts only when no normal one waits, unless it has waited
    `low_priority_max_wait_s`: then it goes ahead of the normal ones submitted after it, so it never
    starves. Queue positions count normal requests first (the starvation bound aside)."""

    def __init__(self, ttl_s: float, low_priority_max_wait_s: float = 300.0) -> None:
        self.ttl_s = ttl_s
        self.low_priority_max_wait_s = low_priority_max_wait_s

    @abstractmethod
    async def enqueue(self, request: NewRequest, max_pending: int) -> int | None:
        """Queue position of the new request, or None (and nothing stored) when the queue is full."""

    @abstractmethod
    async def get(self, request_id: str) -> RequestRecord | None: ...

    @abstractmethod
    async def claim(self, worker: str, lease_s: float) -> RequestRecord | None:
        """Take the request at the head of the queue, mark it IN_PROGRESS under `worker`'s lease and
        count the attempt."""

    @abstractmethod
    async def renew(self, request_id: str, worker: str, lease_s: float) -> bool:
        """Extend the lease; False when the request is no longer this worker's."""

    @abstractmethod
    async def append_logs(self, request_id: str, worker: str, entries: list[LogEntry]) -> bool:
        """Add log entries while `worker` holds the request; False (nothing added) otherwise."""

    @abstractmethod
    async def complete(self, request_id: str, completion: Completion, worker: str | None = None) -> bool:
        """Mark COMPLETED with its result; the record expires `ttl_s` later. With `worker`, only while
        that worker holds the request (a late worker never overwrites a result): False otherwise."""

    @abstractmethod
    async def release(self, request_id: str, worker: str) -> bool:
        """Hand a running request of `worker` back to the head of the queue now (a stopping replica)."""

    @abstractmethod
    async def cancel(self, request_id: str) -> CancelOutcome:
        """Queued: removed and completed as cancelled. Running: flagged for its worker."""

    @abstractmethod
    async def cancel_requested(self, request_id: str) -> bool: ...

    @abstractmethod
    async def requeue_expired(self) -> list[str]:
        """Put running requests whose lease ran out back at the head of the queue."""

    @abstractmethod
    async def delete(self, request_id: str) -> None: ...

    @abstractmethod
    async def pending(self) -> int: ...

    async def close(self) -> None:
        return None


def open_store(settings: Settings) -> RequestStore:
    if settings.redis_url:
        return RedisRequestStore(settings.redis_url, settings.result_ttl_s, settings.queue_low_priority_max_wait_s)
    return SqliteRequestStore(settings.queue_db_path, settings.result_ttl_s, settings.queue_low_priority_max_wait_s)


# --------------------------------------------------------------------------- embedded (SQLite)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    worker TEXT,
    lease_until REAL,
    cancel INTEGER NOT NULL DEFAULT 0,
    completion TEXT,
    expires_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    low INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_status ON requests (status, seq);
CREATE TABLE IF NOT EXISTS logs (id TEXT NOT NULL, entry TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS logs_id ON logs (id);
"""


_ADDED_COLUMNS = {
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "low": "INTEGER NOT NULL DEFAULT 0",
    "created": "REAL NOT NULL DEFAULT 0",
}


class SqliteRequestStore(RequestStore):
    """One SQLite file (WAL) shared by the replicas of one node; needs no server."""

    def __init__(self, path: Path, ttl_s: float, low_priority_max_wait_s: float = 300.0) -> None:
        super().__init__(ttl_s, low_priority_max_wait_s)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(requests)")}
            for column, kind in _ADDED_COLUMNS.items():  # a file written by an earlier version
                if column not in columns:
                    self._db.execute(f"ALTER TABLE requests ADD COLUMN {column} {kind}")

    async def _run(self, fn, *args, write: bool = True):
        def locked():
            with self._lock:
                # Writers take the database's write lock up front (no lost updates between
                # replicas); readers only need a consistent snapshot, which WAL gives without it.
                self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    out = fn(self._db, *args)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return out

        return await asyncio.to_thread(locked)

    async def enqueue(self, request: NewRequest, max_pending: int) -> int | None:
        def op(db: sqlite3.Connection) -> int | None:
            waiting = db.execute("SELECT COUNT(*) FROM requests WHERE status='IN_QUEUE'").fetchone()[0]
            if waiting >= max_pending:
                return None
            cursor = db.execute(
                "INSERT INTO requests (id, request, status, low, created) VALUES (?, ?, 'IN_QUEUE', ?, ?)",
                (request.id, request.model_dump_json(), request.priority == "low", request.created_at),
            )
            return self._position(db, cursor.lastrowid, request.priority == "low")

        return await self._run(op)

    async def get(self, request_id: str) -> RequestRecord | None:
        def op(db: sqlite3.Connection) -> RequestRecord | None:
            row = db.execute(
                "SELECT seq, request, status, completion, expires_at, attempts, low FROM requests WHERE id=?",
                (request_id,),
            ).fetchone()
            if row is None or (row[4] is not None and row[4] < time.time()):
                return None
            seq, request, status, completion, _, attempts, low = row
            record = RequestRecord(**json.loads(request), status=status, attempts=attempts)
            if status == "IN_QUEUE":
                record.queue_position = self._position(db, seq, bool(low))
            logs = db.execute("SELECT entry FROM logs WHERE id=? ORDER BY rowid", (request_id,)).fetchall()
            record.logs = [LogEntry.model_validate_json(e) for (e,) in logs]
            if completion is not None:
                record.set_completion(Completion.model_validate_json(completion))
            return record

        return await self._run(op, write=False)

    async def claim(self, worker: str, lease_s: float) -> RequestRecord | None:
        def op(db: sqlite3.Connection) -> str | None:
            # Normal requests, and low ones that waited past the bound, in submit order; then the rest.
            row = db.execute(
                "SELECT id FROM requests WHERE status='IN_QUEUE' ORDER BY (low AND created > ?), seq LIMIT 1",
                (time.time() - self.low_priority_max_wait_s,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE requests SET status='IN_PROGRESS', worker=?, lease_until=?, attempts=attempts+1 WHERE id=?",
                (worker, time.time() + lease_s, row[0]),
            )
            return row[0]

        claimed = await self._run(op)
        return await self.get(claimed) if claimed else None

    async def renew(self, request_id: str, worker: str, lease_s: float) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE requests SET lease_until=? WHERE id=? AND worker=? AND status='IN_PROGRESS'",
                (time.time() + lease_s, request_id, worker),
            )
            return cursor.rowcount == 1

        return await self._run(op)

    @staticmethod
    def _position(db: sqlite3.Connection, seq: int, low: bool) -> int:
        """Waiting requests ahead of this one: normal ones first, then low ones."""
        ahead = "low=0 AND seq<?" if not low else "(low=0 OR seq<?)"
        return db.execute(f"SELECT COUNT(*) FROM requests WHERE status='IN_QUEUE' AND {ahead}", (seq,)).fetchone()[0]

    @staticmethod
    def _holds(db: sqlite3.Connection, request_id: str, worker: str) -> bool:
        row = db.execute("SELECT worker, status FROM requests WHERE id=?", (request_id,)).fetchone()
        return row is not None and row == (worker, "IN_PROGRESS")

    async def append_logs(self, request_id: str, worker: str, entries: list[LogEntry]) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            if not self._holds(db, request_id, worker):
                return False
            db.executemany(
                "INSERT INTO logs (id, entry) VALUES (?, ?)", [(request_id, e.model_dump_json()) for e in entries]
            )
            return True

        return await self._run(op)

    def _complete(self, db: sqlite3.Connection, request_id: str, completion: Completion) -> None:
        db.execute(
            "UPDATE requests SET status='COMPLETED', worker=NULL, lease_until=NULL, completion=?, expires_at=? "
            "WHERE id=?",
            (completion.model_dump_json(), time.time() + self.ttl_s, request_id),
        )

    async def complete(self, request_id: str, completion: Completion, worker: str | None = None) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            if worker is not None and not self._holds(db, request_id, worker):
                return False
            self._complete(db, request_id, completion)
            return True

        return await self._run(op)

    async def release(self, request_id: str, worker: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            # Its original seq puts it back ahead of everything submitted after it.
            cursor = db.execute(
                "UPDATE requests SET status='IN_QUEUE', worker=NULL, lease_until=NULL "
                "WHERE id=? AND worker=? AND status='IN_PROGRESS'",
                (request_id, worker),
            )
            return cursor.rowcount == 1

        return await self._run(op)

    async def cancel(self, request_id: str) -> CancelOutcome:
        def op(db: sqlite3.Connection) -> CancelOutcome:
            row = db.execute("SELECT status, expires_at FROM requests WHERE id=?", (request_id,)).fetchone()
            if row is None or (row[1] is not None and row[1] < time.time()):
                return "unknown"
            if row[0] == "COMPLETED":
                return "completed"
            if row[0] == "IN_QUEUE":
                self._complete(db, request_id, CANCELLED)
                return "removed"
            db.execute("UPDATE requests SET cancel=1 WHERE id=?", (request_id,))
            return "requested"

        return await self._run(op)

    async def cancel_requested(self, request_id: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT cancel FROM requests WHERE id=?", (request_id,)).fetchone()
            return bool(row and row[0])

        return await self._run(op, write=False)

    async def requeue_expired(self) -> list[str]:
        def op(db: sqlite3.Connection) -> list[str]:
            now = time.time()
            db.execute("DELETE FROM logs WHERE id IN (SELECT id FROM requests WHERE expires_at < ?)", (now,))
            db.execute("DELETE FROM requests WHERE expires_at < ?", (now,))
            ids = [r[0] for r in db.execute(
                "SELECT id FROM requests WHERE status='IN_PROGRESS' AND lease_until < ?", (now,)
            ).fetchall()]
            # Keeping its original seq puts the request ahead of everything submitted after it.
            db.executemany("UPDATE requests SET status='IN_QUEUE', worker=NULL WHERE id=?", [(i,) for i in ids])
            return ids

        return await self._run(op)

    async def delete(self, request_id: str) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM requests WHERE id=?", (request_id,))
            db.execute("DELETE FROM logs WHERE id=?", (request_id,))

        await self._run(op)

    async def pending(self) -> int:
        return await self._run(
            lambda db: db.execute("SELECT COUNT(*) FROM requests WHERE status='IN_QUEUE'").fetchone()[0], write=False
        )

    async def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------- Redis

# Two waiting lists: KEYS[1] (normal) and KEYS[1]..':low'; a record's 'priority' says which is its.
_ENQUEUE = """
local low = KEYS[1] .. ':low'
if redis.call('LLEN', KEYS[1]) + redis.call('LLEN', low) >= tonumber(ARGV[2]) then return -1 end
redis.call('HSET', KEYS[2], 'request', ARGV[3], 'status', 'IN_QUEUE', 'priority', ARGV[4], 'created', ARGV[5])
if ARGV[4] == 'low' then
  redis.call('RPUSH', low, ARGV[1])
  return redis.call('LLEN', KEYS[1]) + redis.call('LLEN', low) - 1
end
redis.call('RPUSH', KEYS[1], ARGV[1])
return redis.call('LLEN', KEYS[1]) - 1
"""
# ARGV[4]: a low-priority request created before this time has waited long enough to go first.
_CLAIM = """
local low = KEYS[1] .. ':low'
while true do
  local list = KEYS[1]
  local oldest_low = redis.call('LINDEX', low, 0)
  if oldest_low then
    local created = tonumber(redis.call('HGET', ARGV[1] .. 'r:' .. oldest_low, 'created') or '0')
    if redis.call('LLEN', KEYS[1]) == 0 or created < tonumber(ARGV[4]) then list = low end
  end
  local id = redis.call('LPOP', list)
  if not id then return false end
  local rec = ARGV[1] .. 'r:' .. id
  if redis.call('HGET', rec, 'status') == 'IN_QUEUE' then
    redis.call('HSET', rec, 'status', 'IN_PROGRESS', 'worker', ARGV[2])
    redis.call('HINCRBY', rec, 'attempts', 1)
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    return id
  end
end
"""
_RENEW = """
if redis.call('HGET', KEYS[2], 'worker') ~= ARGV[2] or redis.call('HGET', KEYS[2], 'status') ~= 'IN_PROGRESS' then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
return 1
"""
# ARGV[4]: the worker that must hold the request, or '' for any state (a queued request's cancel).
_COMPLETE = """
if ARGV[4] ~= '' and (redis.call('HGET', KEYS[2], 'worker') ~= ARGV[4]
                      or redis.call('HGET', KEYS[2], 'status') ~= 'IN_PROGRESS') then
  return 0
end
redis.call('HSET', KEYS[2], 'status', 'COMPLETED', 'worker', '', 'completion', ARGV[2])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1
"""
_APPEND_LOGS = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then
  return 0
end
for i = 2, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
return 1
"""
_RELEASE = """
if redis.call('HGET', KEYS[3], 'worker') ~= ARGV[2] or redis.call('HGET', KEYS[3], 'status') ~= 'IN_PROGRESS' then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], 'status', 'IN_QUEUE', 'worker', '')
local list = KEYS[1]
if redis.call('HGET', KEYS[3], 'priority') == 'low' then list = list .. ':low' end
redis.call('LPUSH', list, ARGV[1])
return 1
"""
_CANCEL = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return 'unknown' end
if status == 'COMPLETED' then return 'completed' end
if status == 'IN_QUEUE' then
  redis.call('LREM', KEYS[1], 0, ARGV[1])
  redis.call('LREM', KEYS[1] .. ':low', 0, ARGV[1])
  redis.call('HSET', KEYS[2], 'status', 'COMPLETED', 'completion', ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  return 'removed'
end
redis.call('HSET', KEYS[2], 'cancel', '1')
return 'requested'
"""
_REQUEUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
for i = #ids, 1, -1 do
  local id = ids[i]
  redis.call('ZREM', KEYS[2], id)
  local rec = ARGV[1] .. 'r:' .. id
  if redis.call('HGET', rec, 'status') == 'IN_PROGRESS' then
    redis.call('HSET', rec, 'status', 'IN_QUEUE', 'worker', '')
    local list = KEYS[1]
    if redis.call('HGET', rec, 'priority') == 'low' then list = list .. ':low' end
    redis.call('LPUSH', list, id)
  end
end
return ids
"""


class RedisRequestStore(RequestStore):
    """Redis: shared by replicas on every node; records expire through Redis TTLs."""

    PREFIX = "srpo:queue:"

    def __init__(self, url: str, ttl_s: float, low_priority_max_wait_s: float = 300.0) -> None:
        import redis.asyncio as aioredis  # only deployments that use Redis need the package
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError, TimeoutError
        from redis.retry import Retry

        super().__init__(ttl_s, low_priority_max_wait_s)
        # After a Redis restart the pool's connections are dead: check one idle for a second before use
        # (a PING, reconnecting if needed), and retry a command that meets a closed connection.
        self._redis = aioredis.Redis.from_url(
            url, decode_responses=True, health_check_interval=1,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 5), retry_on_error=[ConnectionError, TimeoutError],
        )
        self._pending = self.PREFIX + "pending"
        self._pending_low = self._pending + ":low"  # the scripts derive the same name
        self._running = self.PREFIX + "running"
        self._scripts = {
            name: self._redis.register_script(src)
            for name, src in [("enqueue", _ENQUEUE), ("claim", _CLAIM), ("renew", _RENEW), ("complete", _COMPLETE),
                              ("cancel", _CANCEL), ("requeue", _REQUEUE), ("append_logs", _APPEND_LOGS),
                              ("release", _RELEASE)]
        }

    def _rec(self, request_id: str) -> str:
        return f"{self.PREFIX}r:{request_id}"

    def _logs(self, request_id: str) -> str:
        return f"{self.PREFIX}l:{request_id}"

    @property
    def _ttl(self) -> int:
        return max(1, round(self.ttl_s))

    async def enqueue(self, request: NewRequest, max_pending: int) -> int | None:
        position = await self._scripts["enqueue"](
            keys=[self._pending, self._rec(request.id)],
            args=[request.id, max_pending, request.model_dump_json(), request.priority, request.created_at],
        )
        return None if position < 0 else int(position)

    async def get(self, request_id: str) -> RequestRecord | None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._rec(request_id))
            pipe.lrange(self._logs(request_id), 0, -1)
            pipe.lpos(self._pending, request_id)
            pipe.lpos(self._pending_low, request_id)
            pipe.llen(self._pending)
            fields, logs, position, low_position, normal_waiting = await pipe.execute()
        if not fields.get("request"):
            return None
        record = RequestRecord(**json.loads(fields["request"]), status=fields["status"],
                               attempts=int(fields.get("attempts") or 0))
        record.logs = [LogEntry.model_validate_json(e) for e in logs]
        if record.status == "IN_QUEUE":
            if low_position is not None:  # behind every normal request (see RequestStore)
                position = normal_waiting + low_position
            record.queue_position = int(position) if position is not None else 0
        if fields.get("completion"):
            record.set_completion(Completion.model_validate_json(fields["completion"]))
        return record

    async def claim(self, worker: str, lease_s: float) -> RequestRecord | None:
        claimed = await self._scripts["claim"](
            keys=[self._pending, self._running],
            args=[self.PREFIX, worker, time.time() + lease_s, time.time() - self.low_priority_max_wait_s],
        )
        return await self.get(claimed) if claimed else None

    async def renew(self, request_id: str, worker: str, lease_s: float) -> bool:
        renewed = await self._scripts["renew"](
            keys=[self._running, self._rec(request_id)], args=[request_id, worker, time.time() + lease_s]
        )
        return bool(renewed)

    async def append_logs(self, request_id: str, worker: str, entries: list[LogEntry]) -> bool:
        return bool(await self._scripts["append_logs"](
            keys=[self._rec(request_id), self._logs(request_id)], args=[worker, *(e.model_dump_json() for e in entries)]
        ))

    async def complete(self, request_id: str, completion: Completion, worker: str | None = None) -> bool:
        return bool(await self._scripts["complete"](
            keys=[self._running, self._rec(request_id), self._logs(request_id)],
            args=[request_id, completion.model_dump_json(), self._ttl, worker or ""],
        ))

    async def release(self, request_id: str, worker: str) -> bool:
        return bool(await self._scripts["release"](
            keys=[self._pending, self._running, self._rec(request_id)], args=[request_id, worker]
        ))

    async def cancel(self, request_id: str) -> CancelOutcome:
        return await self._scripts["cancel"](
            keys=[self._pending, self._rec(request_id), self._logs(request_id)],
            args=[request_id, CANCELLED.model_dump_json(), self._ttl],
        )

    async def cancel_requested(self, request_id: str) -> bool:
        return await self._redis.hget(self._rec(request_id), "cancel") == "1"

    async def requeue_expired(self) -> list[str]:
        return await self._scripts["requeue"](keys=[self._pending, self._running], args=[self.PREFIX, time.time()])

    async def delete(self, request_id: str) -> None:
        await self._redis.delete(self._rec(request_id), self._logs(request_id))

    async def pending(self) -> int:
        return await self._redis.llen(self._pending) + await self._redis.llen(self._pending_low)

    async def close(self) -> None:
        await self._redis.aclose()
