"""Queue records shared by every ingress replica: an embedded SQLite file or Redis.

A record holds a queued request from submit to expiry: its input, status, logs and result (an
input or result larger than `payload_inline_max_bytes` lives in object storage and the record
holds its name, so records and status polls stay small). The
pending queue lives in the store too, so a request accepted by one replica can be run by any
other. A running request holds a lease its replica renews; when a replica dies, the lease runs
out and the request goes back to the head of the queue (`requeue_expired`), so nothing accepted
is lost. Every transition is one atomic operation (a SQLite write transaction, a Redis Lua
script), so replicas never claim the same request twice and a full queue enqueues nothing.

A status read costs the same at any queue depth: waiting counts are kept as counters, a queue
position is a rank (Redis: a sorted set's; SQLite: a per-process sorted list of the waiting
requests, kept current from a log of the queue's moves), and logs are read from an offset. Every change is announced
(`Changes`: Redis pub/sub, or in-process for SQLite) so held status reads and streams wake on it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from sortedcontainers import SortedList

from api.queue_schemas import LogEntry, QueueState
from settings import Settings

logger = logging.getLogger(__name__)

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

    @classmethod
    def stored(cls, request_json: str | bytes, status: QueueState, attempts: int) -> RequestRecord:
        """The record of a stored request's JSON (pydantic parses it: half of `json.loads` then validate)."""
        record = cls.model_validate_json(request_json)
        record.status, record.attempts = status, attempts
        return record

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


Change = Literal["request", "queue"]


class Watch:
    """One reader's subscription to a request's changes and the queue's moves. Opened before the reader
    reads the request, so a change landing between its read and its wait is seen (a Redis read's answer
    and a notification published after it can reach this process in either order)."""

    def __init__(self, changes: Changes) -> None:
        self._changes = changes
        self._event = asyncio.Event()
        self._seen: set[Change] = set()
        self.waiting = False

    def wake(self, change: Change) -> None:
        self._seen.add(change)
        self._event.set()

    def follow_queue(self, on: bool) -> None:
        """Whether queue moves concern the reader (its request waits)."""
        if on:
            self._changes._queue_watches.add(self)
        else:
            self._changes._queue_watches.discard(self)

    async def next(self, timeout_s: float) -> Change | None:
        """The first change since the watch opened or last answered, waiting up to `timeout_s`
        ("request" wins over "queue"); None when nothing changed."""
        self.waiting = True
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            self.waiting = False
        seen, self._seen = self._seen, set()
        self._event.clear()
        return "request" if "request" in seen else ("queue" if seen else None)


class Changes:
    """This process's readers watching store changes: a request's own (status, logs) or a move of the
    queue (a waiting request left or came back, so positions changed). One notification source per
    process wakes them, never a timer per reader."""

    def __init__(self) -> None:
        self._watches: dict[str, set[Watch]] = {}
        self._queue_watches: set[Watch] = set()

    def changed(self, request_id: str) -> None:
        for watch in self._watches.get(request_id, ()):
            watch.wake("request")

    def moved(self) -> None:
        for watch in self._queue_watches:
            watch.wake("queue")

    def everything(self) -> None:
        """Anything may have changed (another process wrote, notifications were lost): every reader
        looks again, at the pace of queue moves."""
        for watches in self._watches.values():
            for watch in watches:
                watch.wake("queue")

    def watched(self, request_id: str) -> bool:
        """Whether a reader of this process waits for a change of the request now."""
        return any(watch.waiting for watch in self._watches.get(request_id, ()))

    @contextmanager
    def watch(self, request_id: str) -> Iterator[Watch]:
        """A watch on the request, following queue moves until told otherwise (`Watch.follow_queue`)."""
        watch = Watch(self)
        self._watches.setdefault(request_id, set()).add(watch)
        self._queue_watches.add(watch)
        try:
            yield watch
        finally:
            watches = self._watches.get(request_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[request_id]
            self._queue_watches.discard(watch)


class RequestStore(ABC):
    """Priorities: a low-priority request starts only when no normal one waits, unless it has waited
    `low_priority_max_wait_s`: then it goes ahead of the normal ones submitted after it, so it never
    starves. Queue positions count normal requests first (the starvation bound aside)."""

    # Errors that say the store could not be reached, so nothing was written: the app answers them 503.
    unreachable: tuple[type[Exception], ...] = ()

    def __init__(self, ttl_s: float, low_priority_max_wait_s: float = 300.0) -> None:
        self.ttl_s = ttl_s
        self.low_priority_max_wait_s = low_priority_max_wait_s
        self.changes = Changes()

    def watch(self, request_id: str) -> AbstractContextManager[Watch]:
        """Watch the request's changes (and the queue's moves): open it before reading the request."""
        self._listen()
        return self.changes.watch(request_id)

    def _listen(self) -> None:
        """Start receiving other processes' change notifications (once per event loop)."""

    @abstractmethod
    async def enqueue(self, request: NewRequest, max_pending: int) -> int | None:
        """Queue position of the new request, or None (and nothing stored) when the queue is full."""

    @abstractmethod
    async def get(self, request_id: str, logs: bool = True) -> RequestRecord | None:
        """The record; its log entries only with `logs` (a status read fetches them with `logs_from`)."""

    @abstractmethod
    async def positions(self, request_ids: list[str]) -> dict[str, int]:
        """Queue positions of those of `request_ids` still waiting, in one read of the store (held
        status reads refresh their positions together when the queue moves)."""

    @abstractmethod
    async def logs_from(self, request_id: str, start: int) -> list[LogEntry]:
        """The request's log entries from index `start` on (entries are only ever appended)."""

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
-- The periodic sweep finds expired records through it: a scan of the table held the write lock
-- for tens of ms at 100k records, in front of every submit and cancel.
CREATE INDEX IF NOT EXISTS requests_expiry ON requests (expires_at);
CREATE TABLE IF NOT EXISTS logs (id TEXT NOT NULL, entry TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS logs_id ON logs (id);
"""


_ADDED_COLUMNS = {
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "low": "INTEGER NOT NULL DEFAULT 0",
    "created": "REAL NOT NULL DEFAULT 0",
}

# Per lane (0 normal, 1 low): how many wait. Triggers keep the counts, so no write path can forget to.
_COUNTS = """
CREATE INDEX IF NOT EXISTS requests_waiting ON requests (status, low, seq);
CREATE TABLE IF NOT EXISTS queue_counts (lane INTEGER PRIMARY KEY, waiting INTEGER NOT NULL);
INSERT OR IGNORE INTO queue_counts (lane, waiting)
    SELECT lane, (SELECT COUNT(*) FROM requests WHERE status='IN_QUEUE' AND low=lane)
    FROM (SELECT 0 AS lane UNION ALL SELECT 1);
CREATE TRIGGER IF NOT EXISTS queue_in AFTER INSERT ON requests WHEN NEW.status='IN_QUEUE' BEGIN
    UPDATE queue_counts SET waiting=waiting+1 WHERE lane=NEW.low;
END;
CREATE TRIGGER IF NOT EXISTS queue_move AFTER UPDATE OF status ON requests
WHEN (OLD.status='IN_QUEUE') != (NEW.status='IN_QUEUE') BEGIN
    UPDATE queue_counts SET waiting=waiting+(CASE NEW.status WHEN 'IN_QUEUE' THEN 1 ELSE -1 END) WHERE lane=NEW.low;
END;
CREATE TRIGGER IF NOT EXISTS queue_out AFTER DELETE ON requests WHEN OLD.status='IN_QUEUE' BEGIN
    UPDATE queue_counts SET waiting=waiting-1 WHERE lane=OLD.low;
END;
"""
QUEUE_LOG_KEPT = 100_000  # entries; a process that fell further behind rebuilds its positions
# Every request entering or leaving the queue, in commit order (ids have no gaps: AUTOINCREMENT,
# and only the oldest entries are ever deleted). Each process keeps its own ordered copy of the
# waiting requests and applies the entries since it last looked (_Positions).
_QUEUE_LOG = """
CREATE TABLE IF NOT EXISTS queue_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER NOT NULL, low INTEGER NOT NULL, waiting INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS queue_log_in AFTER INSERT ON requests WHEN NEW.status='IN_QUEUE' BEGIN
    INSERT INTO queue_log (seq, low, waiting) VALUES (NEW.seq, NEW.low, 1);
END;
CREATE TRIGGER IF NOT EXISTS queue_log_move AFTER UPDATE OF status ON requests
WHEN (OLD.status='IN_QUEUE') != (NEW.status='IN_QUEUE') BEGIN
    INSERT INTO queue_log (seq, low, waiting) VALUES (NEW.seq, NEW.low, NEW.status='IN_QUEUE');
END;
CREATE TRIGGER IF NOT EXISTS queue_log_out AFTER DELETE ON requests WHEN OLD.status='IN_QUEUE' BEGIN
    INSERT INTO queue_log (seq, low, waiting) VALUES (OLD.seq, OLD.low, 0);
END;
CREATE TRIGGER IF NOT EXISTS queue_log_trim AFTER INSERT ON queue_log BEGIN
    DELETE FROM queue_log WHERE id <= NEW.id - {kept};
END;
"""
EXACT_POSITIONS_UP_TO = 1000  # rows a read on the event loop may scan; more go to a thread
WATCH_INTERVAL_S = 0.05  # how often a process looks for other processes' commits (PRAGMA data_version)


class _Slow(Exception):
    """A read on the event loop met a long scan: it runs on a thread instead."""


class _Positions:
    """Each lane's waiting seqs, sorted: a position is a rank (O(log n)). Kept current by applying
    the queue log since the last look, so a read costs what changed, not the queue's depth; built
    from the table once per process, and again only when it fell more than QUEUE_LOG_KEPT behind.
    Reads on the event loop and on a thread share it: `current` holds it for one of them at a time."""

    def __init__(self) -> None:
        self.lanes: tuple[SortedList, SortedList] = (SortedList(), SortedList())
        self.through: int | None = None  # the last queue log entry applied
        self._lock = threading.Lock()

    @contextmanager
    def current(self, db: sqlite3.Connection, inline: bool) -> Iterator[_Positions]:
        """Brought up to `db`'s snapshot and held meanwhile. `inline` (on the event loop): raise _Slow
        instead of waiting for a thread that holds it, or reading more than EXACT_POSITIONS_UP_TO rows."""
        if not self._lock.acquire(blocking=not inline):
            raise _Slow
        try:
            self._sync(db, inline)
            yield self
        finally:
            self._lock.release()

    def _sync(self, db: sqlite3.Connection, inline: bool) -> None:
        if self.through is not None:
            entries = db.execute("SELECT id, seq, low, waiting FROM queue_log WHERE id>? ORDER BY id LIMIT ?",
                                 (self.through, EXACT_POSITIONS_UP_TO + 1 if inline else -1)).fetchall()
            if inline and len(entries) > EXACT_POSITIONS_UP_TO:
                raise _Slow
            if not entries or entries[0][0] == self.through + 1:  # nothing missed
                for _, seq, low, waiting in entries:
                    (self.lanes[low].add if waiting else self.lanes[low].discard)(seq)
                self.through = entries[-1][0] if entries else self.through
                return
        if inline and db.execute("SELECT SUM(waiting) FROM queue_counts").fetchone()[0] > EXACT_POSITIONS_UP_TO:
            raise _Slow
        rows = db.execute("SELECT low, seq FROM requests WHERE status='IN_QUEUE' ORDER BY low, seq").fetchall()
        self.lanes = (SortedList(seq for low, seq in rows if not low), SortedList(seq for low, seq in rows if low))
        self.through = db.execute("SELECT COALESCE(MAX(id), 0) FROM queue_log").fetchone()[0]

    def position(self, seq: int, low: bool) -> int:
        """Waiting requests ahead: normal ones first, then low ones."""
        if low:
            return len(self.lanes[0]) + self.lanes[1].bisect_left(seq)
        return self.lanes[0].bisect_left(seq)


class SqliteRequestStore(RequestStore):
    """One SQLite file (WAL) shared by the replicas of one node; needs no server."""

    def __init__(self, path: Path, ttl_s: float, low_priority_max_wait_s: float = 300.0) -> None:
        super().__init__(ttl_s, low_priority_max_wait_s)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._lock = threading.Lock()  # the writing connection: writes, and reads too long for the event loop
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # A commit then writes the WAL without waiting for the disk (the checkpoint does): a crashed
            # replica loses nothing, only the machine losing power could lose the last commits, and a
            # submit costs a fraction of an fsync (issue 25: submits were bound by it).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(requests)")}
            for column, kind in _ADDED_COLUMNS.items():  # a file written by an earlier version
                if column not in columns:
                    self._db.execute(f"ALTER TABLE requests ADD COLUMN {column} {kind}")
            self._db.executescript(_COUNTS)
            self._db.executescript(_QUEUE_LOG.format(kept=QUEUE_LOG_KEPT))
        # Reads on the event loop have a connection of their own: under WAL they need no writer to
        # finish, and a write on a thread (tens of ms while the loop keeps the GIL busy) held the one
        # connection, sending every status read meanwhile to a thread behind it (issue 25).
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._reader.execute("PRAGMA query_only=1")
        self._reader_lock = threading.Lock()
        self._positions = _Positions()
        self._watching: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def _transaction(db: sqlite3.Connection, fn, args: tuple, write: bool):
        # Writers take the database's write lock up front (no lost updates between replicas);
        # readers only need a consistent snapshot, which WAL gives without it.
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            out = fn(db, *args)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    def _inline(self, db: sqlite3.Connection) -> bool:
        """Whether a read on `db` runs on the event loop (see _run)."""
        return db is self._reader

    async def _run(self, fn, *args, write: bool = True):
        if not write and self._reader_lock.acquire(blocking=False):
            # A read runs here, on the event loop: a point read under WAL waits for no writer and
            # costs less than the hop to a thread (issue 25: the hop was most of a status read).
            # One that would scan goes there.
            try:
                return self._transaction(self._reader, fn, args, write)
            except _Slow:
                pass
            finally:
                self._reader_lock.release()

        def locked():
            with self._lock:
                return self._transaction(self._db, fn, args, write)

        return await asyncio.to_thread(locked)

    async def enqueue(self, request: NewRequest, max_pending: int) -> int | None:
        def op(db: sqlite3.Connection) -> int | None:
            normal, low = self._waiting(db)
            if normal + low >= max_pending:
                return None
            db.execute(
                "INSERT INTO requests (id, request, status, low, created) VALUES (?, ?, 'IN_QUEUE', ?, ?)",
                (request.id, request.model_dump_json(), request.priority == "low", request.created_at),
            )
            return normal + low if request.priority == "low" else normal

        return await self._run(op)

    async def get(self, request_id: str, logs: bool = True) -> RequestRecord | None:
        def op(db: sqlite3.Connection) -> RequestRecord | None:
            row = db.execute(
                "SELECT seq, request, status, completion, expires_at, attempts, low FROM requests WHERE id=?",
                (request_id,),
            ).fetchone()
            if row is None or (row[4] is not None and row[4] < time.time()):
                return None
            seq, request, status, completion, _, attempts, low = row
            record = RequestRecord.stored(request, status, attempts)
            if status == "IN_QUEUE":
                with self._positions.current(db, self._inline(db)) as positions:
                    record.queue_position = positions.position(seq, bool(low))
            if logs:
                record.logs = self._logs_from(db, request_id, 0)
            if completion is not None:
                record.set_completion(Completion.model_validate_json(completion))
            return record

        return await self._run(op, write=False)

    async def positions(self, request_ids: list[str]) -> dict[str, int]:
        def op(db: sqlite3.Connection) -> dict[str, int]:
            # By id alone: with the status in the WHERE, SQLite scans every waiting row for a few hundred
            # ids (32 ms at 100k waiting, on the event loop) instead of looking each up.
            marks = ",".join("?" * len(request_ids))
            rows = db.execute(f"SELECT id, seq, low, status FROM requests WHERE id IN ({marks})",
                              request_ids).fetchall()
            with self._positions.current(db, self._inline(db)) as positions:
                return {i: positions.position(seq, bool(low)) for i, seq, low, status in rows if status == "IN_QUEUE"}

        return await self._run(op, write=False) if request_ids else {}

    @staticmethod
    def _logs_from(db: sqlite3.Connection, request_id: str, start: int) -> list[LogEntry]:
        rows = db.execute("SELECT entry FROM logs WHERE id=? ORDER BY rowid LIMIT -1 OFFSET ?", (request_id, start))
        return [LogEntry.model_validate_json(e) for (e,) in rows]

    async def logs_from(self, request_id: str, start: int) -> list[LogEntry]:
        return await self._run(lambda db: self._logs_from(db, request_id, start), write=False)

    @staticmethod
    def _waiting(db: sqlite3.Connection) -> tuple[int, int]:
        """(normal, low) requests waiting."""
        (normal,), (low,) = db.execute("SELECT waiting FROM queue_counts ORDER BY lane").fetchall()
        return normal, low

    def _listen(self) -> None:
        # This process's own writes notify directly; another process's (a second ingress replica on
        # the node) show up as a new PRAGMA data_version, looked at by one task per process.
        loop = asyncio.get_running_loop()
        if self._watching is not loop:
            self._watching = loop
            version = self._data_version()  # now, not in the task: a commit before its first look would go unseen
            loop.create_task(self._watch(loop, version))

    def _data_version(self, wait: bool = True) -> int | None:
        # On the writing connection: the version moves with every other connection's commit, and this
        # process's own writes notify directly. Without `wait`, None while a thread writes.
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            return self._db.execute("PRAGMA data_version").fetchone()[0]
        finally:
            self._lock.release()

    async def _watch(self, loop: asyncio.AbstractEventLoop, version: int) -> None:
        while self._watching is loop:
            try:
                seen = self._data_version(wait=False)  # a point read: on the event loop
            except sqlite3.ProgrammingError:  # closed
                return
            if seen is not None and seen != version:
                self.changes.everything()
                version = seen
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def claim(self, worker: str, lease_s: float) -> RequestRecord | None:
        def op(db: sqlite3.Connection) -> str | None:
            # Normal requests, and low ones that waited past the bound, in submit order; then the rest.
            # Each lane's head is an index lookup: one ORDER BY over both lanes sorted the whole queue
            # under the write lock, so at 100k waiting every claim held up submits and cancels.
            head = "SELECT seq, id, created FROM requests WHERE status='IN_QUEUE' AND low=? ORDER BY seq LIMIT 1"
            normal, low = db.execute(head, (0,)).fetchone(), db.execute(head, (1,)).fetchone()
            # The oldest low request has waited longest: when it has not waited past the bound, none has.
            starved = (low is not None and low[2] <= time.time() - self.low_priority_max_wait_s
                       and (normal is None or low[0] < normal[0]))
            chosen = low if starved or normal is None else normal
            if chosen is None:
                return None
            db.execute(
                "UPDATE requests SET status='IN_PROGRESS', worker=?, lease_until=?, attempts=attempts+1 WHERE id=?",
                (worker, time.time() + lease_s, chosen[1]),
            )
            return chosen[1]

        claimed = await self._run(op)
        if not claimed:
            return None
        self._moved(claimed)
        return await self.get(claimed, logs=False)

    def _moved(self, *request_ids: str) -> None:
        for request_id in request_ids:
            self.changes.changed(request_id)
        self.changes.moved()

    async def renew(self, request_id: str, worker: str, lease_s: float) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE requests SET lease_until=? WHERE id=? AND worker=? AND status='IN_PROGRESS'",
                (time.time() + lease_s, request_id, worker),
            )
            return cursor.rowcount == 1

        return await self._run(op)

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

        return self._changed(request_id, await self._run(op))

    def _changed(self, request_id: str, changed: bool) -> bool:
        if changed:
            self.changes.changed(request_id)
        return changed

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

        return self._changed(request_id, await self._run(op))

    async def release(self, request_id: str, worker: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            # Its original seq puts it back ahead of everything submitted after it.
            cursor = db.execute(
                "UPDATE requests SET status='IN_QUEUE', worker=NULL, lease_until=NULL "
                "WHERE id=? AND worker=? AND status='IN_PROGRESS'",
                (request_id, worker),
            )
            return cursor.rowcount == 1

        released = await self._run(op)
        if released:
            self._moved(request_id)
        return released

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

        outcome = await self._run(op)
        if outcome == "removed":
            self._moved(request_id)
        return outcome

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

        ids = await self._run(op)
        if ids:
            self._moved(*ids)
        return ids

    async def delete(self, request_id: str) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM requests WHERE id=?", (request_id,))
            db.execute("DELETE FROM logs WHERE id=?", (request_id,))

        await self._run(op)
        self.changes.changed(request_id)

    async def pending(self) -> int:
        return sum(await self._run(self._waiting, write=False))

    async def close(self) -> None:
        self._watching = None
        with self._lock, self._reader_lock:
            self._db.close()
            self._reader.close()


# --------------------------------------------------------------------------- Redis

# Two waiting sets, KEYS[1] (normal) and KEYS[1]..':low', each a sorted set scored by the request's
# submit sequence: a position is a ZRANK and a cancel a ZREM (both O(log n)), and a request handed
# back goes to its old place. A record's 'priority' and 'seq' say which set and where. Every change
# is published on CHANNEL: the request's id, and MOVED when waiting requests' positions changed.
_LANE = """
local function lane(base, rec)
  if redis.call('HGET', rec, 'priority') == 'low' then return base .. ':low' end
  return base
end
local function back_in_queue(base, rec, id)
  redis.call('HSET', rec, 'status', 'IN_QUEUE', 'worker', '')
  redis.call('ZADD', lane(base, rec), tonumber(redis.call('HGET', rec, 'seq') or '0'), id)
end
"""
_ENQUEUE = """
local low = KEYS[1] .. ':low'
if redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', low) >= tonumber(ARGV[2]) then return -1 end
local seq = redis.call('INCR', KEYS[1] .. ':seq')
redis.call('HSET', KEYS[2], 'request', ARGV[3], 'status', 'IN_QUEUE', 'priority', ARGV[4], 'created', ARGV[5],
           'seq', seq)
if ARGV[4] == 'low' then
  redis.call('ZADD', low, seq, ARGV[1])
  return redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', low) - 1
end
redis.call('ZADD', KEYS[1], seq, ARGV[1])
return redis.call('ZCARD', KEYS[1]) - 1
"""
# A read: the record's fields, its ranks in both lanes, the normal lane's size and its log entries.
# One script rather than a MULTI/EXEC pipeline of the same commands: as atomic, and cheaper for
# redis-py (issue 25: `get` 175 against 231 us of CPU, docs/benchmarks.md). Only the fields a record is
# made of, flat: redis-py's reply parser costs per element and per level of nesting.
_GET = """
local out = redis.call('HMGET', KEYS[1], 'request', 'status', 'attempts', 'completion')
table.insert(out, redis.call('ZRANK', KEYS[2], ARGV[1]))
table.insert(out, redis.call('ZRANK', KEYS[2] .. ':low', ARGV[1]))
table.insert(out, redis.call('ZCARD', KEYS[2]))
return {out, redis.call('LRANGE', KEYS[3], 0, -1)}
"""
# The same without logs for many requests (KEYS: the normal lane, then each record), flat: the lane's
# size, then RECORD_READ values per request. The status reads asked while the last batch was in flight share it.
RECORD_READ = 6  # request, status, attempts, completion, rank in the normal lane, rank in the low lane
_GET_MANY = """
local out = {redis.call('ZCARD', KEYS[1])}
for i, id in ipairs(ARGV) do
  local f, n = redis.call('HMGET', KEYS[i + 1], 'request', 'status', 'attempts', 'completion'), #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4] = f[1], f[2], f[3], f[4]
  out[n + 5], out[n + 6] = redis.call('ZRANK', KEYS[1], id), redis.call('ZRANK', KEYS[1] .. ':low', id)
end
return out
"""
# ARGV[4]: a low-priority request created before this time has waited long enough to go first.
# Positions of many requests in one call (held status reads ask for hundreds at once): -1 for one
# that no longer waits.
_POSITIONS = """
local normal_waiting = redis.call('ZCARD', KEYS[1])
local out = {}
for i, id in ipairs(ARGV) do
  local rank = redis.call('ZRANK', KEYS[1], id)
  if not rank then
    rank = redis.call('ZRANK', KEYS[1] .. ':low', id)
    if rank then rank = normal_waiting + rank else rank = -1 end
  end
  out[i] = rank
end
return out
"""

_CLAIM = """
local low = KEYS[1] .. ':low'
while true do
  local list = KEYS[1]
  local oldest_low = redis.call('ZRANGE', low, 0, 0)[1]
  if oldest_low then
    local created = tonumber(redis.call('HGET', ARGV[1] .. 'r:' .. oldest_low, 'created') or '0')
    if redis.call('ZCARD', KEYS[1]) == 0 or created < tonumber(ARGV[4]) then list = low end
  end
  local id = redis.call('ZPOPMIN', list)[1]
  if not id then return false end
  local rec = ARGV[1] .. 'r:' .. id
  if redis.call('HGET', rec, 'status') == 'IN_QUEUE' then
    redis.call('HSET', rec, 'status', 'IN_PROGRESS', 'worker', ARGV[2])
    redis.call('HINCRBY', rec, 'attempts', 1)
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    redis.call('PUBLISH', ARGV[5], id)
    redis.call('PUBLISH', ARGV[5], ARGV[6])
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
redis.call('PUBLISH', ARGV[5], ARGV[1])
return 1
"""
_APPEND_LOGS = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then
  return 0
end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
_RELEASE = _LANE + """
if redis.call('HGET', KEYS[3], 'worker') ~= ARGV[2] or redis.call('HGET', KEYS[3], 'status') ~= 'IN_PROGRESS' then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
back_in_queue(KEYS[1], KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
_CANCEL = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return 'unknown' end
if status == 'COMPLETED' then return 'completed' end
if status == 'IN_QUEUE' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[1] .. ':low', ARGV[1])
  redis.call('HSET', KEYS[2], 'status', 'COMPLETED', 'completion', ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('PUBLISH', ARGV[4], ARGV[1])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 'removed'
end
redis.call('HSET', KEYS[2], 'cancel', '1')
return 'requested'
"""
_REQUEUE = _LANE + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  local rec = ARGV[1] .. 'r:' .. id
  if redis.call('HGET', rec, 'status') == 'IN_PROGRESS' then
    back_in_queue(KEYS[1], rec, id)
    redis.call('PUBLISH', ARGV[3], id)
  end
end
if #ids > 0 then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return ids
"""
# Waiting lists of an earlier version (plain lists under KEYS[3]): into the sorted sets, in order.
_MIGRATE = """
for i, list in ipairs({KEYS[3], KEYS[3] .. ':low'}) do
  local target = KEYS[1]
  if i == 2 then target = KEYS[1] .. ':low' end
  if redis.call('TYPE', list).ok == 'list' then
    for _, id in ipairs(redis.call('LRANGE', list, 0, -1)) do
      local seq = redis.call('INCR', KEYS[1] .. ':seq')
      redis.call('HSET', ARGV[1] .. 'r:' .. id, 'seq', seq)
      redis.call('ZADD', target, seq, id)
    end
    redis.call('DEL', list)
  end
end
return 1
"""
RECONNECT_S = 1.0  # after a lost notification connection, how long before subscribing again
CLOSE_WAIT_S = 5.0  # how long close() waits for the subscription's teardown
REDIS_CONNECTIONS = 64  # per process
REDIS_POOL_WAIT_S = 20.0


class RedisRequestStore(RequestStore):
    """Redis: shared by replicas on every node; records expire through Redis TTLs."""

    PREFIX = "srpo:queue:"
    MOVED = "*"  # published when positions changed (request ids never contain it at the start)

    def __init__(self, url: str, ttl_s: float, low_priority_max_wait_s: float = 300.0) -> None:
        import redis.asyncio as aioredis  # only deployments that use Redis need the package
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError, TimeoutError
        from redis.retry import Retry

        super().__init__(ttl_s, low_priority_max_wait_s)
        # After a Redis restart the pool's connections are dead: check one idle for a second before use
        # (a PING, reconnecting if needed), and retry a command that meets a closed connection.
        # Hundreds of held status reads wake at once on a queue move: past REDIS_CONNECTIONS, a command
        # waits for a free connection (up to REDIS_POOL_WAIT_S) instead of failing.
        self._redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            url, decode_responses=True, health_check_interval=1, max_connections=REDIS_CONNECTIONS,
            timeout=REDIS_POOL_WAIT_S,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 5), retry_on_error=[ConnectionError, TimeoutError],
        ))
        self.unreachable = (ConnectionError,)  # after the retries above: Redis is down, not slow
        self._waiting = self.PREFIX + "waiting"
        self._waiting_low = self._waiting + ":low"  # the scripts derive the same name
        self._running = self.PREFIX + "running"
        self._channel = self.PREFIX + "changes"
        self._migrated = False
        self._listening: asyncio.AbstractEventLoop | None = None
        self._follower: asyncio.Task | None = None
        self._reads: dict[str, list[asyncio.Future]] | None = None  # status reads of this turn, by id
        self._reading: asyncio.Task | None = None  # held so the task is not collected mid-read
        self._scripts = {
            name: self._redis.register_script(src)
            for name, src in [("enqueue", _ENQUEUE), ("get", _GET), ("get_many", _GET_MANY), ("positions", _POSITIONS),
                              ("claim", _CLAIM),
                              ("renew", _RENEW), ("complete", _COMPLETE), ("cancel", _CANCEL), ("requeue", _REQUEUE),
                              ("append_logs", _APPEND_LOGS), ("release", _RELEASE), ("migrate", _MIGRATE)]
        }

    def _rec(self, request_id: str) -> str:
        return f"{self.PREFIX}r:{request_id}"

    def _logs(self, request_id: str) -> str:
        return f"{self.PREFIX}l:{request_id}"

    @property
    def _ttl(self) -> int:
        return max(1, round(self.ttl_s))

    async def _migrate(self) -> None:
        if not self._migrated:
            await self._scripts["migrate"](keys=[self._waiting, self._running, self.PREFIX + "pending"],
                                           args=[self.PREFIX])
            self._migrated = True

    def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        if self._listening is not loop:
            self._listening = loop
            self._follower = loop.create_task(self._follow(loop))

    async def _follow(self, loop: asyncio.AbstractEventLoop) -> None:
        """One subscription per process turns the channel's messages into wake-ups."""
        while self._listening is loop:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    self.changes.everything()  # anything published before the subscription
                    async for message in pubsub.listen():
                        if message["data"] == self.MOVED:
                            self.changes.moved()
                        else:
                            self.changes.changed(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._listening is not loop:
                    return
                logger.warning("lost the store's change notifications; subscribing again", exc_info=True)
                self.changes.everything()
                await asyncio.sleep(RECONNECT_S)

    async def enqueue(self, request: NewRequest, max_pending: int) -> int | None:
        await self._migrate()
        position = await self._scripts["enqueue"](
            keys=[self._waiting, self._rec(request.id)],
            args=[request.id, max_pending, request.model_dump_json(), request.priority, request.created_at],
        )
        return None if position < 0 else int(position)

    async def get(self, request_id: str, logs: bool = True) -> RequestRecord | None:
        if not logs:
            return await self._get_coalesced(request_id)
        values, entries = await self._scripts["get"](
            keys=[self._rec(request_id), self._waiting, self._logs(request_id)], args=[request_id])
        record = self._record(values[:RECORD_READ], values[RECORD_READ])
        if record is not None and entries:
            record.logs = [LogEntry.model_validate_json(e) for e in entries]
        return record

    @staticmethod
    def _record(values: list, normal_waiting: int) -> RequestRecord | None:
        request, status, attempts, completion, position, low_position = values
        if not request:
            return None
        record = RequestRecord.stored(request, status, int(attempts or 0))
        if record.status == "IN_QUEUE":
            if low_position is not None:  # behind every normal request (see RequestStore)
                position = normal_waiting + low_position
            record.queue_position = int(position) if position is not None else 0
        if completion:
            record.set_completion(Completion.model_validate_json(completion))
        return record

    async def _get_coalesced(self, request_id: str) -> RequestRecord | None:
        """Reads go to Redis in batches, one batch at a time: those asked for while a batch is in
        flight (or in this turn of the event loop) go together as the next. redis-py's fixed cost per
        command (the pool, the send, the reply parser) was most of a status read's CPU (issue 25)."""
        loop = asyncio.get_running_loop()
        if self._reading is not None and self._reading.get_loop() is not loop:  # a store outliving its loop
            self._reading = self._reads = None
        if self._reads is None:
            self._reads = {}
            if self._reading is None or self._reading.done():
                self._reading = loop.create_task(self._read_batches())
        answer = loop.create_future()
        self._reads.setdefault(request_id, []).append(answer)
        return await answer

    async def _read_batches(self) -> None:
        while self._reads:
            reads, self._reads = self._reads, None
            await self._read_many(reads)

    async def _read_many(self, reads: dict[str, list[asyncio.Future]]) -> None:
        ids = list(reads)
        try:
            normal_waiting, *values = await self._scripts["get_many"](
                keys=[self._waiting, *map(self._rec, ids)], args=ids)
            records = [self._record(values[i:i + RECORD_READ], normal_waiting)
                       for i in range(0, len(values), RECORD_READ)]
        except Exception as exc:  # every reader of the batch gets the store's error
            for answers in reads.values():
                for answer in answers:
                    if not answer.done():
                        answer.set_exception(exc)
            return
        for request_id, record in zip(ids, records):
            for i, answer in enumerate(reads[request_id]):
                if not answer.done():  # its reader may have gone; each other reader gets its own copy
                    answer.set_result(record.model_copy(deep=True) if i and record is not None else record)

    async def positions(self, request_ids: list[str]) -> dict[str, int]:
        if not request_ids:
            return {}
        ranks = await self._scripts["positions"](keys=[self._waiting], args=request_ids)
        return {request_id: int(rank) for request_id, rank in zip(request_ids, ranks) if rank >= 0}

    async def logs_from(self, request_id: str, start: int) -> list[LogEntry]:
        return [LogEntry.model_validate_json(e) for e in await self._redis.lrange(self._logs(request_id), start, -1)]

    async def claim(self, worker: str, lease_s: float) -> RequestRecord | None:
        await self._migrate()
        claimed = await self._scripts["claim"](
            keys=[self._waiting, self._running],
            args=[self.PREFIX, worker, time.time() + lease_s, time.time() - self.low_priority_max_wait_s,
                  self._channel, self.MOVED],
        )
        return await self.get(claimed, logs=False) if claimed else None

    async def renew(self, request_id: str, worker: str, lease_s: float) -> bool:
        renewed = await self._scripts["renew"](
            keys=[self._running, self._rec(request_id)], args=[request_id, worker, time.time() + lease_s]
        )
        return bool(renewed)

    async def append_logs(self, request_id: str, worker: str, entries: list[LogEntry]) -> bool:
        return bool(await self._scripts["append_logs"](
            keys=[self._rec(request_id), self._logs(request_id)],
            args=[worker, self._channel, request_id, *(e.model_dump_json() for e in entries)],
        ))

    async def complete(self, request_id: str, completion: Completion, worker: str | None = None) -> bool:
        return bool(await self._scripts["complete"](
            keys=[self._running, self._rec(request_id), self._logs(request_id)],
            args=[request_id, completion.model_dump_json(), self._ttl, worker or "", self._channel],
        ))

    async def release(self, request_id: str, worker: str) -> bool:
        return bool(await self._scripts["release"](
            keys=[self._waiting, self._running, self._rec(request_id)],
            args=[request_id, worker, self._channel, self.MOVED],
        ))

    async def cancel(self, request_id: str) -> CancelOutcome:
        return await self._scripts["cancel"](
            keys=[self._waiting, self._rec(request_id), self._logs(request_id)],
            args=[request_id, CANCELLED.model_dump_json(), self._ttl, self._channel, self.MOVED],
        )

    async def cancel_requested(self, request_id: str) -> bool:
        return await self._redis.hget(self._rec(request_id), "cancel") == "1"

    async def requeue_expired(self) -> list[str]:
        return await self._scripts["requeue"](keys=[self._waiting, self._running],
                                              args=[self.PREFIX, time.time(), self._channel, self.MOVED])

    async def delete(self, request_id: str) -> None:
        await self._redis.delete(self._rec(request_id), self._logs(request_id))
        await self._redis.publish(self._channel, request_id)

    async def pending(self) -> int:
        return await self._redis.zcard(self._waiting) + await self._redis.zcard(self._waiting_low)

    async def close(self) -> None:
        self._listening = None
        # The subscription ends first, on a pool that still works: its teardown is not cancellable, so
        # one left to the event loop's own shutdown could wait on connections already closed.
        if self._follower is not None and self._follower.get_loop() is asyncio.get_running_loop():
            self._follower.cancel()
            await asyncio.wait([self._follower], timeout=CLOSE_WAIT_S)
        self._follower = None
        await self._redis.aclose()
