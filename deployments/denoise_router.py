"""Ray Serve request router for the Denoiser: work waits in front until a replica can start it soon.

The rule is scheduling/dispatch.py's: the replica with the least estimated remaining work gets the
request, and only while that work is within the horizon the replica's policy reports; otherwise
`choose_replicas` offers none and the request stays queued in this router (FIFO, retried with a
short backoff), where whichever replica frees first takes it. Other Denoiser methods (stats,
health, fault injection) go anywhere.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from models.request import GenerationRequest
from scheduling.cost_model import CostModel
from scheduling.dispatch import BacklogLedger, ReplicaLoad, choose_replica


def request_work_s(cost: CostModel, request: GenerationRequest, mode: str) -> float:
    """Estimated Denoiser time of a request run alone (image-to-image runs int(steps * strength))."""
    steps = request.num_inference_steps - int(request.num_inference_steps * (1 - request.strength))
    return steps * cost.step_s((request.width // 16) * (request.height // 16), request.num_images, mode)


def pending_work_s(cost: CostModel, pending: PendingRequest) -> float | None:
    """The work a `denoise` call carries; None for other methods."""
    if pending.metadata.call_method != "denoise":
        return None
    request = pending.args[0] if pending.args else pending.kwargs["request"]
    mode = pending.args[3] if len(pending.args) > 3 else pending.kwargs.get("acceleration", "none")
    return request_work_s(cost, request, mode)


class LeastWorkRouter(FIFOMixin, RequestRouter):
    """FIFOMixin: a replica found for one waiting request goes to the oldest one (Serve's routing
    tasks otherwise race, and the queue in front would serve in random order)."""

    def initialize_state(self, **_: Any) -> None:
        self.cost: CostModel | None = None  # the replicas' profile, from their first report
        self.ledger = BacklogLedger(default_horizon_s=0.0)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        for replica in candidate_replicas:
            stats = replica.routing_stats
            if "at_s" in stats:
                self.ledger.report(replica.replica_id, ReplicaLoad(**stats["load"]), stats["at_s"])
                self.cost = self.cost or CostModel.load(stats["cost_profile"])
        work = pending_work_s(self.cost, pending_request) if self.cost and pending_request else None
        if work is None:
            return [candidate_replicas]  # before the first report, or not a denoise call: Serve's usual choice
        now = time.time()
        by_id = {r.replica_id: r for r in candidate_replicas}
        share = self.num_pending_requests / len(by_id)
        loads = {rid: self.ledger.load(rid, now) for rid in by_id}
        chosen = choose_replica({rid: ReplicaLoad(load.backlog_s, load.horizon_for(share)) for rid, load in loads.items()})
        if chosen is None:
            # Serve's loop calls again at once unless told to back off, and this coroutine never awaits:
            # without the flag it would hold the event loop.
            pending_request.routing_context.should_backoff = True
            return []
        # Serve sends a request (the oldest waiting, FIFOMixin) to the replica chosen here; on_request_routed
        # is not called on every path. A mismatched estimate lasts until the replica's next report.
        self.ledger.sent(chosen, pending_request.metadata.internal_request_id, work, now)
        return [[by_id[chosen]]]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.ledger.completed(replica_id, internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.ledger.forget(replica_id)
