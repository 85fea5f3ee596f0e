"""When a request runs again: after a failure of the infrastructure (a replica that died or could
not be reached), never after a failure caused by the input.

The backend says which failures are transient (`GenerationBackend.is_transient`); this policy says
how often and how long to wait. A retried request runs from the start with the same seed, so its
pixels are those of an undisturbed run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_s: float = 0.5  # before the second attempt; doubled after each further failure

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        transient: Callable[[BaseException], bool],
        log: Callable[[str], None],
        deadline: float | None = None,
    ) -> T:
        """`attempt()` until it succeeds, fails for good, or the attempts or the deadline
        (`time.monotonic()`) run out; the last failure is raised."""
        number = 1
        while True:
            try:
                return await attempt()
            except Exception as exc:
                wait = self.backoff_s * 2 ** (number - 1)
                out_of_time = deadline is not None and time.monotonic() + wait >= deadline
                if not transient(exc) or number >= self.max_attempts or out_of_time:
                    raise
                number += 1
                log(f"Retrying: {describe(exc)} (attempt {number} of {self.max_attempts} in {wait:g} s)")
                await asyncio.sleep(wait)


def describe(exc: BaseException) -> str:
    """A one-line, client-safe description of an infrastructure failure."""
    return f"a model replica stopped or could not be reached ({type(exc).__name__})"
