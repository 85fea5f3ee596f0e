"""Background housekeeping that must survive its own failures."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

logger = logging.getLogger(__name__)


async def every(interval_s: float, job: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `job` now and then every `interval_s` until cancelled; a failure is logged and retried next time."""
    while True:
        try:
            await job()
        except Exception:  # e.g. storage briefly unreachable: the next run catches up
            logger.exception("%s failed; retrying in %.0f s", what, interval_s)
        await asyncio.sleep(interval_s)
