"""How many Denoiser replicas the estimated work asks for (no Ray): the autoscaler's rule.

Counting requests misjudges a text-to-image server: a 4-image 1440x1440 request is ~20x the work
of a 512x512 one. The rule counts seconds of estimated Denoiser work instead: what the replicas
hold (their backlog, from the cost model) plus what waits in front of them (in Serve's routers and
in the request store), each waiting request at the mean work of the requests admitted lately.
Replicas wanted = that work / the backlog one replica should carry, and at least one while anything
waits: with no replica running (scaled to zero) nothing reports the work of a request, and a waiting
request needs a replica whatever its size. Serve's autoscaler applies the bounds, the up/down delays
and the scaling factors on top (deployments/autoscaling.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkEstimate:
    backlog_s: float  # summed over the replicas: their requests' remaining work
    waiting: float  # requests not yet in any replica: router queues plus the request store
    request_s: float  # mean estimated work of one request

    @property
    def total_s(self) -> float:
        return self.backlog_s + self.waiting * self.request_s


def desired_replicas(work: WorkEstimate, target_backlog_s: float) -> float:
    """Replicas that carry `work` at `target_backlog_s` each (a fraction: Serve rounds up)."""
    if target_backlog_s <= 0:
        raise ValueError("target_backlog_s must be positive")
    return max(work.total_s / target_backlog_s, 1.0 if work.waiting > 0 else 0.0)
