"""The Denoiser's scheduling policy: which active requests share the next forward (no torch, no Ray).

The engine (models/engine.py) describes its active requests as `Active` records and runs what
`pick` returns; the policies never touch tensors, so they run unchanged in the simulator
(benchmarks/simulate.py) and in the tests on a virtual clock.

- `CostAware` ("cost", the default): shortest remaining work first, every request's wait bounded,
  and a request joins a batch only when the cost model says that lowers completion times.
- `CoBatch` ("cobatch"): the oldest request's group, filled in arrival order up to the token budget.
- `OneAtATime` ("fcfs"): the oldest request alone.
- `RequestLevel` ("request"): `CoBatch`'s batch, run until all its members leave (like `@serve.batch`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

from scheduling.cost_model import TEXT_TOKENS, CostModel


@dataclass(frozen=True)
class Active:
    """What a policy knows of one active request."""

    key: int  # unique, increasing with arrival
    arrived_s: float
    group: Hashable  # requests of one group can share a forward (same resolution and module)
    image_tokens: int  # per sample
    samples: int
    mode: str
    remaining_steps: int
    total_steps: int

    @property
    def tokens(self) -> int:
        return self.samples * (self.image_tokens + TEXT_TOKENS)


@dataclass(frozen=True)
class Waiting:
    """Work queued in front of the whole deployment (router queues, the request store): requests and
    their estimated work alone, as far as the caller knows."""

    requests: float = 0.0
    work_s: float = 0.0


class QueueInFront:
    """What waits in front of the deployment, pieced together from reports of several sources (each
    router as it sends a request, the request store when read). A report is run down from when it was
    made as if all replicas drained it and nothing arrived: old news counts for less, and a queue that
    nobody reports again is soon taken as gone."""

    def __init__(self) -> None:
        self._reports: dict[Hashable, tuple[float, Waiting]] = {}

    def report(self, source: Hashable, waiting: Waiting, at_s: float) -> None:
        self._reports[source] = (at_s, waiting)

    def at(self, now_s: float, replicas: int) -> Waiting:
        requests = work_s = 0.0
        for at_s, waiting in self._reports.values():
            left = max(0.0, waiting.work_s - max(0.0, now_s - at_s) * replicas)
            if left > 0:
                requests += waiting.requests * left / waiting.work_s
                work_s += left
        return Waiting(requests, work_s)


class Policy(Protocol):
    name: str
    replicas: int  # replicas of the deployment sharing the queue in front
    front: QueueInFront  # fed by the owner; what `waiting=None` means below

    def pick(self, active: Sequence[Active], now_s: float, waiting: Waiting | None = None) -> list[Active]:
        """The requests of the next forward: one group, never empty if `active` is not."""

    def admitted(self, request: Active, now_s: float) -> None:
        """A request entered this replica (feeds load estimates)."""

    def horizon_s(self, active: Sequence[Active], now_s: float, waiting: Waiting | None = None) -> float:
        """Admit more work while the replica's estimated remaining work is at most this."""


def _fill(head: Active, candidates: Sequence[Active], max_tokens: int) -> list[Active]:
    """`head` plus the candidates of its group, in the given order, while the token budget allows."""
    chosen, used = [head], head.tokens
    for a in candidates:
        if a is not head and a.group == head.group and used + a.tokens <= max_tokens:
            chosen.append(a)
            used += a.tokens
    return chosen


class _Simple:
    """What the fixed policies share: no load estimate, admit only when idle."""

    name = ""
    replicas = 1

    def __init__(self, max_batch_tokens: int) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.front = QueueInFront()  # reported to, never read

    def admitted(self, request: Active, now_s: float) -> None:
        pass

    def horizon_s(self, active: Sequence[Active], now_s: float, waiting: Waiting | None = None) -> float:
        return 0.0


class CoBatch(_Simple):
    name = "cobatch"

    def pick(self, active: Sequence[Active], now_s: float, waiting: Waiting | None = None) -> list[Active]:
        if not active:
            return []
        ordered = sorted(active, key=lambda a: a.key)
        return _fill(ordered[0], ordered, self.max_batch_tokens)


class OneAtATime(_Simple):
    name = "fcfs"

    def pick(self, active: Sequence[Active], now_s: float, waiting: Waiting | None = None) -> list[Active]:
        return [min(active, key=lambda a: a.key)] if active else []


class RequestLevel(CoBatch):
    name = "request"

    def __init__(self, max_batch_tokens: int) -> None:
        super().__init__(max_batch_tokens)
        self._batch: set[int] = set()

    def pick(self, active: Sequence[Active], now_s: float, waiting: Waiting | None = None) -> list[Active]:
        still = [a for a in active if a.key in self._batch]
        batch = still or super().pick(active, now_s)
        self._batch = {a.key for a in batch}
        return batch


class LoadEstimate:
    """Arrival rate and offered load (work per second) over a sliding window of admissions."""

    def __init__(self, window_s: float, first_window_s: float) -> None:
        self.window_s = window_s
        self.first_window_s = first_window_s
        self._first_s: float | None = None
        self._seen: deque[tuple[float, float]] = deque()  # (time, work alone in seconds)
        self._work_s = 0.0  # of what _seen holds

    def add(self, now_s: float, work_s: float) -> None:
        self._first_s = now_s if self._first_s is None else self._first_s
        self._seen.append((now_s, work_s))
        self._work_s += work_s

    def rates(self, now_s: float) -> tuple[float, float]:
        """(requests per second, utilisation). A fresh replica averages over the time since its first
        request, but at least `first_window_s`: a burst that meets a new replica counts in full, a
        single early request does not look like a flood."""
        while self._seen and self._seen[0][0] < now_s - self.window_s:
            self._work_s -= self._seen.popleft()[1]
        if not self._seen:
            self._work_s = 0.0  # no rounding drift past an idle spell
            return 0.0, 0.0
        span = min(self.window_s, max(self.first_window_s, now_s - self._first_s))
        return len(self._seen) / span, self._work_s / span


class CostAware:
    """Shortest remaining work first; bounded waits; batches only where the cost model says it pays.

    Order: a request whose wait exceeds `wait_factor` times its unloaded time plus `wait_slack_s`
    is overdue, and overdue requests go first, oldest first; the rest go by least remaining work
    alone. So a request waits for later arrivals only until it is overdue, then only for older
    overdue requests: no starvation.

    Batching: adding request m to batch B saves s = c(B) + c(m) - c(B+m) of device time (c: one
    forward's cost) and delays B's members by c(B+m) - c(B) each. The saving reaches m and every
    request that completes after this forward: the other active ones, those waiting in front, and
    the arrivals expected before the backlog clears (lambda * W / (1 - rho) for this replica's
    arrival rate lambda, load rho and backlog W: a single server's busy period; with R replicas
    sharing one queue in front it drains about R times faster, so the term is divided by R).
    What waits in front of the deployment is shared by its R replicas: each counts 1/R of the requests
    behind. A lone replica's busy period runs from that queue's work too (all of it runs there); with
    several, from the replica's own backlog: the shared queue's work in every replica's busy period
    counted it about R / (1 - rho) times over, and replicas batched at steady loads where one at a
    time keeps the tail shorter (docs/scheduling.md). m joins when
    s * (1 + behind) > |B| * (c(B+m) - c(B)), and only while the stretch of the head's remaining time
    to the batch's cost is at most that time plus the work ahead besides the batch (the replica's
    other requests and its share of the queue in front): otherwise the batch, not the queue, makes
    the tail.
    So under a burst, when the queue in front is deep, replicas batch (the saved device time
    shortens every wait behind), and as it drains they go back to one request at a time.
    Compute-bound sizes save a few percent, so they batch only near saturation; small images save
    more and batch sooner.
    """

    name = "cost"

    def __init__(
        self,
        cost: CostModel,
        max_batch_tokens: int,
        *,
        wait_factor: float = 4.0,
        wait_slack_s: float = 30.0,
        window_s: float = 300.0,
        first_window_s: float = 60.0,
        max_load: float = 0.98,
        max_load_with_queue: float = 0.9,
        single_replica_widening: float = 4.0,
        admit_ahead_s: float = 0.0,
    ) -> None:
        self.cost = cost
        self.max_batch_tokens = max_batch_tokens
        self.wait_factor = wait_factor
        self.wait_slack_s = wait_slack_s
        # While work waits in front, a replica admits about what it can run, whatever is offered: its
        # load estimate reads ~1 at 95% load as in overload. 1 / (1 - load) then multiplies the busy
        # period's work 50-fold at 0.98: harmless on a replica's own backlog (a forward or two), but where
        # that work includes the queue in front (a lone replica) every short queue would look like the
        # start of an endless busy period. Overload shows in the queue in front instead.
        self.max_load = max_load
        self.max_load_with_queue = max_load_with_queue
        self.load = LoadEstimate(window_s, first_window_s)
        self.replicas = 1  # of this deployment: set by the owner, it scales the arrivals term
        self.front = QueueInFront()  # fed by the owner: the queue in front of the deployment
        self.single_replica_widening = single_replica_widening
        self.admit_ahead_s = admit_ahead_s  # routers see a replica's load this late: ask for work that much sooner

    def step_s(self, a: Active) -> float:
        return self.cost.step_s(a.image_tokens, a.samples, a.mode)

    def remaining_s(self, a: Active) -> float:
        return a.remaining_steps * self.step_s(a)

    def wait_bound_s(self, a: Active) -> float:
        return self.wait_factor * a.total_steps * self.step_s(a) + self.wait_slack_s

    def order(self, active: Sequence[Active], now_s: float) -> list[Active]:
        def key(a: Active) -> tuple:
            overdue = now_s - a.arrived_s > self.wait_bound_s(a)
            return (0, a.key) if overdue else (1, self.remaining_s(a), a.key)

        return sorted(active, key=key)

    def admitted(self, request: Active, now_s: float) -> None:
        self.load.add(now_s, self.remaining_s(request))

    def waiting(self, now_s: float, waiting: Waiting | None) -> Waiting:
        return self.front.at(now_s, self.replicas) if waiting is None else waiting

    def behind(self, active: Sequence[Active], batch_size: int, now_s: float, waiting: Waiting) -> float:
        """Requests expected to complete after the next forward, besides the batch's."""
        rate, load = self.load.rates(now_s)
        backlog_s, max_load = sum(self.remaining_s(a) for a in active), self.max_load
        if self.replicas == 1:  # all of the queue in front runs here: it is this replica's busy period too
            backlog_s, max_load = backlog_s + waiting.work_s, self.max_load_with_queue
        arrivals = rate * backlog_s / (1 - min(load, max_load))
        return len(active) - batch_size + (waiting.requests + arrivals) / self.replicas

    def _joins(self, batch: list[Active], m: Active, behind: float, ahead_s: float) -> bool:
        """`ahead_s`: this replica's backlog plus its share of the queue in front."""
        head = batch[0]
        samples = sum(a.samples for a in batch)
        alone = self.cost.step_s(head.image_tokens, samples, head.mode)
        together = self.cost.step_s(head.image_tokens, samples + m.samples, head.mode)
        saving = alone + self.step_s(m) - together
        # The tail: a batch stretches its head's remaining time. Up to its own length is fine (the
        # partners would have waited that long for it); more only where everything else ahead (not
        # the batch itself) makes requests wait longer anyway.
        stretch_s = head.remaining_steps * (together - self.step_s(head))
        others_s = ahead_s - sum(self.remaining_s(a) for a in batch) - self.remaining_s(m)
        fits_tail = stretch_s <= self.remaining_s(head) + others_s
        return saving * (1 + behind) > len(batch) * (together - alone) and fits_tail

    def ahead_s(self, active: Sequence[Active], waiting: Waiting) -> float:
        return sum(self.remaining_s(a) for a in active) + waiting.work_s / self.replicas

    def pick(self, active: Sequence[Active], now_s: float, waiting: Waiting | None = None) -> list[Active]:
        if not active:
            return []
        ordered = self.order(active, now_s)
        batch = [ordered[0]]
        used = batch[0].tokens
        waiting = self.waiting(now_s, waiting)
        others = self.behind(active, 0, now_s, waiting)  # once per forward: each member makes one fewer behind
        ahead_s = self.ahead_s(active, waiting)
        for m in ordered[1:]:
            if m.group != batch[0].group or used + m.tokens > self.max_batch_tokens:
                continue
            if not self._joins(batch, m, others - (len(batch) + 1), ahead_s):
                break  # later candidates have more remaining work: they would gain no more
            batch.append(m)
            used += m.tokens
        return batch

    def horizon_s(self, active: Sequence[Active], now_s: float, waiting: Waiting | None = None) -> float:
        """One forward's worth, so the next request is there when this one ends; room for a batch
        when one more request like the head would join it."""
        if not active:
            return 0.0
        head = self.order(active, now_s)[0]
        waiting = self.waiting(now_s, waiting)
        # The partner asked about is one more like the head, not one of `active`: its work is not ahead yet.
        ahead_s = self.ahead_s(active, waiting) + self.remaining_s(head)
        one_forward_s = self.step_s(head) + self.admit_ahead_s
        if not self._joins([head], head, self.behind(active, 2, now_s, waiting), ahead_s):
            return one_forward_s
        fits = max(1, self.max_batch_tokens // head.tokens)
        # What a replica holds beyond one forward waits there while another replica might free first: the
        # more replicas share the queue, the less room one takes. A lone replica has no other to keep work
        # for and sees more of the queue, for partners of one size.
        widen = self.single_replica_widening / self.replicas
        return max(one_forward_s, widen * (fits - 1) * head.total_steps * self.step_s(head))


def make_policy(name: str, cost: CostModel, max_batch_tokens: int, **options: float) -> Policy:
    """`options` tune the cost-aware policy (CostAware's keyword arguments); the fixed ones have none."""
    if name == "cost":
        return CostAware(cost, max_batch_tokens, **options)
    simple = {p.name: p for p in (CoBatch, OneAtATime, RequestLevel)}
    if name not in simple:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from cost, {', '.join(simple)}")
    return simple[name](max_batch_tokens)


POLICIES = ("cost", "cobatch", "fcfs", "request")
