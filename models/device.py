"""Device-side timing and copies that never wait for the whole device.

On a GPU, kernels run after the host has queued them, so host time around a forward measures the
queueing, not the forward. `ForwardTimer` brackets forwards with CUDA events and reads them once
the device has passed them (`query`, no wait); on a CPU the host time is the forward's time.
`copy_to_host` waits for one finished tensor only, on a side stream, not for forwards queued later.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ForwardTimer:
    _pending: list[tuple[Hashable, Any, Any]] = field(default_factory=list)

    def start(self, device: torch.device) -> Any:
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, began: Any, key: Hashable) -> None:
        if isinstance(began, float):
            self._pending.append((key, began, time.perf_counter()))
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((key, began, end))

    def finished(self) -> list[tuple[Hashable, float]]:
        """(key, seconds) of every timed forward the device has finished since the last call."""
        done, waiting = [], []
        for key, began, end in self._pending:
            if isinstance(end, float):
                done.append((key, end - began))
            elif end.query():
                done.append((key, began.elapsed_time(end) / 1000))
            else:
                waiting.append((key, began, end))
        self._pending = waiting
        return done


def ready_marker(device: torch.device) -> Any:
    """An event after the work queued so far on `device` (None off CUDA): what `copy_to_host` waits for."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def copy_to_host(tensor: torch.Tensor, ready: Any = None) -> torch.Tensor:
    """`tensor` on the CPU. On CUDA the copy runs on a side stream after `ready` (the forward that
    made the tensor) into pinned memory, and only that copy is waited for."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    stream = torch.cuda.Stream(tensor.device)
    with torch.cuda.stream(stream):
        if ready is not None:
            stream.wait_event(ready)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # the allocator must not reuse its memory before the copy ran
    stream.synchronize()
    return host
