"""Ray Serve request router for the Denoiser: work waits in front until a replica can start it soon.

The rule is scheduling/dispatch.py's: the replica with the least estimated remaining work gets the
request, and only while that work is within the horizon the replica's policy reports; otherwise
`choose_replicas` offers none and the request stays queued in this router (FIFO, retried with a
short backoff), where whichever replica frees first takes it. Other Denoiser methods (stats,
health, fault injection) go anywhere.

The router lives in the caller's process (the Ingress replica); `denoiser_view` gives the caller
its view of the replicas, which decides whether a multi-image request is split (GraphBackend).
Each `denoise` call it sends carries the router's queue (`front`): the replica's policy batches when
the queue in front of the whole deployment is deep (scheduling/policy.py).
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from models.lora_residency import AdapterKey, adapter_key
from models.request import GenerationRequest
from scheduling.cost_model import CostModel
from scheduling.dispatch import BacklogLedger, ReplicaLoad, choose_replica
from scheduling.policy import Waiting


def denoise_steps(request: GenerationRequest) -> int:
    """The steps a request runs (image-to-image runs int(steps * strength), as the pipelines do)."""
    return request.num_inference_steps - int(request.num_inference_steps * (1 - request.strength))


def image_tokens(request: GenerationRequest) -> int:
    return (request.width // 16) * (request.height // 16)


def request_work_s(cost: CostModel, request: GenerationRequest, mode: str) -> float:
    """Estimated Denoiser time of a request (or of its part) run alone."""
    steps = denoise_steps(request) * cost.lora_factor(bool(request.loras))
    return steps * cost.step_s(image_tokens(request), request.samples, mode)


def adapter_id(key: AdapterKey) -> str:
    """A short name of a LoRA set, as replicas report what they hold and routers compare."""
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def denoise_request(pending: PendingRequest) -> GenerationRequest | None:
    """The request a `denoise` call carries; None for other methods."""
    if pending.metadata.call_method != "denoise":
        return None
    return pending.args[0] if pending.args else pending.kwargs["request"]


def pending_work_s(cost: CostModel, pending: PendingRequest) -> float | None:
    """The work a `denoise` call carries; None for other methods."""
    if (request := denoise_request(pending)) is None:
        return None
    mode = pending.args[3] if len(pending.args) > 3 else pending.kwargs.get("acceleration", "none")
    return request_work_s(cost, request, mode)


PLACED_MEMORY_S = 600.0  # how long a router remembers sending a LoRA set to a replica
IN_FLIGHT_S = 0.1  # a request sent this long before a replica's report may not be in it yet (a loaded host)
_ROUTERS: dict[str, LeastWorkRouter] = {}  # by app name: the Denoiser router of each app this process calls


def denoiser_view(app_name: str) -> LeastWorkRouter | None:
    """This process's router to the Denoiser of `app_name`; None until its handle routed a call."""
    return _ROUTERS.get(app_name)


class LeastWorkRouter(FIFOMixin, RequestRouter):
    """FIFOMixin: a replica found for one waiting request goes to the oldest one (Serve's routing
    tasks otherwise race, and the queue in front would serve in random order)."""

    def initialize_state(self, **_: Any) -> None:
        self.cost: CostModel | None = None  # the replicas' profile, from their first report
        self.ledger = BacklogLedger(default_horizon_s=0.0, in_flight_s=IN_FLIGHT_S)
        self.key = uuid.uuid4().hex  # tells this router's reports of its queue apart from other routers'
        self._lock = threading.Lock()  # Serve routes on its own loop; `open_backlogs` is called from the caller's
        self.placed: dict[ReplicaID, dict[str, float]] = {}  # LoRA sets sent to each replica -> last sent at
        # Serve may ship this class by value, a copy with its own module globals: register in the
        # imported module, the one `denoiser_view` reads.
        import deployments.denoise_router as module

        module._ROUTERS[self.app_name] = self

    def _admission(self, replicas: list[RunningReplica], now: float) -> dict[ReplicaID, ReplicaLoad]:
        """Each replica's backlog and the horizon it admits up to now (caller holds the lock)."""
        for replica in replicas:
            stats = replica.routing_stats
            if "at_s" in stats:
                self.ledger.report(replica.replica_id, ReplicaLoad(**stats["load"]), stats["at_s"])
                self.cost = self.cost or CostModel.load(stats["cost_profile"])
        queued = self.num_pending_requests
        loads = {r.replica_id: self.ledger.load(r.replica_id, now) for r in replicas}
        return {rid: ReplicaLoad(load.backlog_s, load.horizon_for(queued)) for rid, load in loads.items()}

    def front(self) -> Waiting:
        """What waits in this router besides the request being routed, each at the mean request's work."""
        waiting = max(0, self.num_pending_requests - 1)
        return Waiting(waiting, waiting * (self.ledger.request_s or 0.0))

    def open_backlogs(self) -> list[float]:
        """The backlog of every replica that would admit a request now (empty before their first report)."""
        with self._lock:
            loads = self._admission(list(self.curr_replicas.values()), time.time())
            if self.cost is None:
                return []
            return [load.backlog_s for load in loads.values() if load.backlog_s <= load.horizon_s]

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        with self._lock:
            return self._choose(candidate_replicas, pending_request)

    def _choose(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        now = time.time()
        admission = self._admission(candidate_replicas, now)
        work = pending_work_s(self.cost, pending_request) if self.cost and pending_request else None
        if work is None:
            return [candidate_replicas]  # before the first report, or not a denoise call: Serve's usual choice
        by_id = {r.replica_id: r for r in candidate_replicas}
        # The replica's policy batches by the queue in front of the deployment: the request tells it this
        # router's. Set on every try: FIFOMixin may send an older request (set on its own tries) instead.
        pending_request.kwargs["front"] = (self.key, self.front())
        chosen = choose_replica(admission, self._lora_miss_s(candidate_replicas, pending_request))
        if chosen is None:
            # Serve's loop calls again at once unless told to back off, and this coroutine never awaits:
            # without the flag it would hold the event loop.
            pending_request.routing_context.should_backoff = True
            return []
        # Serve sends a request (the oldest waiting, FIFOMixin) to the replica chosen here; on_request_routed
        # is not called on every path. A mismatched estimate lasts until the replica's next report.
        self.ledger.sent(chosen, pending_request.metadata.internal_request_id, work, now)
        if (request := denoise_request(pending_request)) is not None and request.loras:
            self.placed.setdefault(chosen, {})[adapter_id(adapter_key(request.loras))] = now
        return [[by_id[chosen]]]

    def _lora_miss_s(self, replicas: list[RunningReplica], pending: PendingRequest) -> dict[ReplicaID, float]:
        """What loading the request's LoRA set would add on each replica that will not hold it: like
        Serve's model multiplexing, but priced inside the least-work choice. On a full replica the
        load also evicts its least recently used set, which costs a reload in proportion to how
        recently this router sent that set (so sets in use keep their replicas)."""
        request = denoise_request(pending)
        if request is None or not request.loras or self.cost is None:
            return {}
        wanted, now = adapter_id(adapter_key(request.loras)), time.time()
        extra = {}
        for replica in replicas:
            resident, slots = self._expected_loras(replica)
            if wanted in resident:
                continue
            price = self.cost.lora_load_s
            if len(resident) >= slots:
                used_at = self.placed.get(replica.replica_id, {}).get(resident[0], float("-inf"))
                price += self.cost.lora_load_s / (1.0 + max(now - used_at, 0.0))
            extra[replica.replica_id] = price
        return extra

    def _expected_loras(self, replica: RunningReplica) -> tuple[list[str], int]:
        """The LoRA sets a replica will hold once what this router sent it since its report has loaded
        (least recently used first), and its slot count."""
        stats = replica.routing_stats
        resident, slots = list(stats.get("loras", ())), stats.get("lora_slots", 1)
        reported_at = stats.get("at_s", float("-inf")) - IN_FLIGHT_S
        sent = self.placed.get(replica.replica_id, {})
        for name in [n for n, at in sorted(sent.items(), key=lambda item: item[1]) if at > reported_at]:
            if name in resident:
                resident.remove(name)
            resident.append(name)
        for name in [n for n, at in sent.items() if at < reported_at - PLACED_MEMORY_S]:
            del sent[name]
        return resident[-slots:], slots

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        with self._lock:
            self.ledger.completed(replica_id, internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        with self._lock:
            self.ledger.forget(replica_id)
            self.placed.pop(replica_id, None)
