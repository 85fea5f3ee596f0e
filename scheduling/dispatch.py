"""Which Denoiser replica gets a request, and when (no Ray): work waits in front of the replicas.

A replica takes a request only while its estimated remaining work is within the horizon its
policy sets (about one forward, or room for a batch when batching pays); among those, the one with
the least remaining work gets it. Otherwise the request keeps waiting in front (in Ray Serve's
router or the request store), where any replica that frees up can take it. The Serve request
router (deployments/denoise_router.py) and the simulator (benchmarks/simulate.py) both use this.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from scheduling.cost_model import CostModel
from scheduling.policy import Active, Policy, Waiting

Key = TypeVar("Key", bound=Hashable)


@dataclass(frozen=True)
class ReplicaLoad:
    backlog_s: float  # estimated remaining work of what it holds
    horizon_s: float  # it takes more while backlog_s is at most this
    # With at least `wide_after` requests waiting in front of the deployment, batching pays and the
    # horizon widens to `wide_horizon_s` (a router knows its own queue at once; the replica learns of
    # the queue in front only as requests reach it, and `horizon_s` already counts what it knows).
    wide_horizon_s: float | None = None
    wide_after: float | None = None

    def horizon_for(self, waiting: float) -> float:
        if self.wide_after is not None and waiting >= self.wide_after:
            return self.wide_horizon_s
        return self.horizon_s


WIDE_AFTER_STEPS = tuple(2**i for i in range(13))  # 1 .. 4096 requests waiting in front


def replica_load(cost: CostModel, policy: Policy, active: Sequence[Active], now_s: float,
                 up_to: float = WIDE_AFTER_STEPS[-1], arriving_s: float = 0.0) -> ReplicaLoad:
    """What a replica reports to the routers: its backlog (with `arriving_s`, the work of requests it
    received and has not started yet), its horizon, and from what queue in front (looked for up to
    `up_to` requests) it widens."""
    base = policy.horizon_s(active, now_s)
    backlog = backlog_s(cost, active) + arriving_s
    # A longer queue only adds to the requests behind: the first step that widens, by bisection.
    steps = [w for w in WIDE_AFTER_STEPS if w <= up_to]
    request_s = statistics.fmean(a.total_steps * cost.step_s(a.image_tokens, a.samples, a.mode)
                                 for a in active) if active else 0.0  # what a waiting request is worth
    low, high, found = 0, len(steps), None
    while low < high:
        mid = (low + high) // 2
        wide = policy.horizon_s(active, now_s, Waiting(steps[mid], steps[mid] * request_s))
        if wide > base:
            high, found = mid, (wide, steps[mid])
        else:
            low = mid + 1
    return ReplicaLoad(backlog, base, *found) if found else ReplicaLoad(backlog, base)


def backlog_s(cost: CostModel, active: Iterable[Active]) -> float:
    """A replica's estimated remaining work: each request's remaining steps, run alone."""
    return sum(a.remaining_steps * cost.step_s(a.image_tokens, a.samples, a.mode) for a in active)


def choose_replica(loads: Mapping[Key, ReplicaLoad], extra_s: Mapping[Key, float] | None = None) -> Key | None:
    """The replica with the least backlog among those that admit; None: keep waiting in front.

    `extra_s`: work a replica would add for this request alone (loading its LoRAs where they are not
    resident), so a replica that holds them wins while backlogs are within that much of each other."""
    extra_s = extra_s or {}
    open_ = [(load.backlog_s + extra_s.get(key, 0.0), i, key) for i, (key, load) in enumerate(loads.items())
             if load.backlog_s <= load.horizon_s]
    return min(open_)[2] if open_ else None


REQUEST_S_WEIGHT = 0.1  # of each new request in a running mean of request work


@dataclass
class BacklogLedger:
    """A router's view of each replica's backlog between the replica's own periodic reports.

    backlog = what the replica last reported, run down by the time since, plus the estimated work
    of every request this router sent it after that report and that has not completed (what it sent
    more than `in_flight_s` before, the report counts; a request sent just before may still have been
    on its way to the replica).
    """

    default_horizon_s: float
    in_flight_s: float = 0.0
    request_s: float | None = None  # running mean of the work of the requests sent (what a waiting one is worth)
    _reports: dict[Hashable, tuple[float, ReplicaLoad]] = field(default_factory=dict)
    _sent: dict[Hashable, dict[str, tuple[float, float]]] = field(default_factory=dict)  # id -> (sent at, work)

    def report(self, replica: Hashable, load: ReplicaLoad, at_s: float) -> None:
        previous = self._reports.get(replica)
        if previous is None or at_s > previous[0]:
            self._reports[replica] = (at_s, load)
            sent = self._sent.get(replica, {})
            for request_id in [r for r, (sent_at, _) in sent.items() if sent_at < at_s - self.in_flight_s]:
                del sent[request_id]  # the report counts it

    def sent(self, replica: Hashable, request_id: str, work_s: float, now_s: float) -> None:
        self._sent.setdefault(replica, {})[request_id] = (now_s, work_s)
        mean = work_s if self.request_s is None else self.request_s
        self.request_s = mean + REQUEST_S_WEIGHT * (work_s - mean)

    def completed(self, replica: Hashable, request_id: str) -> None:
        """A request ended. Routers may send another request than the one they chose for (FIFO):
        an unknown id retires the replica's oldest entry instead."""
        sent = self._sent.get(replica, {})
        if sent.pop(request_id, None) is None and sent:
            del sent[min(sent, key=lambda r: sent[r][0])]

    def forget(self, replica: Hashable) -> None:
        self._reports.pop(replica, None)
        self._sent.pop(replica, None)

    def load(self, replica: Hashable, now_s: float) -> ReplicaLoad:
        at_s, reported = self._reports.get(replica, (float("-inf"), ReplicaLoad(0.0, self.default_horizon_s)))
        since = sum(work for _, work in self._sent.get(replica, {}).values())
        backlog = max(0.0, reported.backlog_s - (now_s - at_s)) if reported.backlog_s else 0.0
        return dataclasses.replace(reported, backlog_s=backlog + since)
