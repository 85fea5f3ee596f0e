"""The Denoiser's Serve autoscaling policy: replicas for the estimated work (scheduling/autoscale.py).

Serve's controller calls it every control-loop tick with the deployment's context: the metrics
each Denoiser replica records (`Denoiser.record_autoscaling_stats`: its backlog, the mean work of
its recent requests, the request store's waiting count) and the requests queued in handles. Serve
then applies min/max_replicas, the up/down delays and the scaling factors. In a Serve config:

    autoscaling_config:
      policy:
        policy_function: deployments.autoscaling:DenoiserWorkPolicy
        policy_kwargs: {target_backlog_s: 12}
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext

from scheduling.autoscale import WorkEstimate, desired_replicas


def work_estimate(ctx: AutoscalingContext) -> WorkEstimate:
    metrics = ctx.aggregated_metrics or {}
    request_s = [s for s in metrics.get("request_s", {}).values() if s > 0]
    return WorkEstimate(
        backlog_s=sum(metrics.get("backlog_s", {}).values()),
        waiting=ctx.total_queued_requests + max(metrics.get("store_waiting", {}).values(), default=0.0),
        request_s=sum(request_s) / len(request_s) if request_s else 0.0,
    )


class DenoiserWorkPolicy:
    def __init__(self, target_backlog_s: float = 12.0) -> None:
        """`target_backlog_s`: the estimated work one replica should carry (what a new request waits)."""
        self.target_backlog_s = target_backlog_s

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        work = work_estimate(ctx)
        return desired_replicas(work, self.target_backlog_s), {"work_s": work.total_s}
