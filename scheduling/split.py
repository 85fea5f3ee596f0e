"""Whether a multi-image request runs its samples on several Denoiser replicas (no torch, no Ray).

A request for k images is k samples with one prompt, one schedule and one seed; the noise of all k
is drawn at once and each part takes its slice, so a sample denoised on another replica gives the
same pixels. Splitting pays when replicas are free: at sizes that fill the device, k samples in one
forward cost nearly k times one sample (H100, 1024x768: 554 ms for 4, 143 ms for 1), so k idle
replicas finish about k times sooner. It does not pay when the other replicas are busy, or for
small images whose batch costs little more than one sample.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduling.cost_model import CostModel


def even_parts(samples: int, parts: int) -> list[int]:
    """`samples` in `parts` counts as equal as they go, larger first: 4 in 3 is [2, 1, 1]."""
    size, extra = divmod(samples, parts)
    return [size + (i < extra) for i in range(parts)]


def finish_s(cost: CostModel, image_tokens: int, steps: int, mode: str, counts: Sequence[int],
             backlogs_s: Sequence[float], part_overhead_s: float) -> float:
    """When the last part ends if part i (larger parts first) goes to the i-th least loaded replica."""
    ends = [b + steps * cost.step_s(image_tokens, n, mode) for b, n in zip(sorted(backlogs_s), counts)]
    return max(ends) + (len(counts) - 1) * part_overhead_s


def plan_split(cost: CostModel, image_tokens: int, samples: int, steps: int, mode: str,
               backlogs_s: Sequence[float], part_overhead_s: float) -> list[int]:
    """Sample counts, one per Denoiser call, in sample order: the split whose last part is estimated
    to end first ([samples] when one call is best).

    `backlogs_s`: the estimated remaining work of each replica that would admit a request now (the
    router sends each part to the least loaded of them, as `finish_s` assumes). Each extra call
    costs `part_overhead_s`; a tie keeps fewer parts.
    """
    best, best_s = [samples], finish_s(cost, image_tokens, steps, mode, [samples], backlogs_s or [0.0], 0.0)
    for parts in range(2, min(samples, len(backlogs_s)) + 1):
        counts = even_parts(samples, parts)
        end = finish_s(cost, image_tokens, steps, mode, counts, backlogs_s, part_overhead_s)
        if end < best_s:
            best, best_s = counts, end
    return best
