"""Delivering fal's completion webhook: a few attempts with a timeout, never failing the request."""

from __future__ import annotations

import asyncio
import logging

import httpx

from api.queue_schemas import WebhookBody
from server.outbound import BlockedDestination, check_destination, describe_failure
from settings import Settings

logger = logging.getLogger(__name__)

WEBHOOK_SETTING = "SRPO_WEBHOOK_ALLOWED_NETWORKS"


async def deliver_webhook(url: str, body: WebhookBody, settings: Settings) -> bool:
    """POST `body` to `url`; True once the receiver answered 2xx. Errors are logged, not raised."""
    try:
        destination = await check_destination(url, settings.webhook_allowed_networks, WEBHOOK_SETTING)
    except BlockedDestination as exc:
        logger.warning("webhook for %s not sent: %s", body.request_id, exc)
        return False
    async with httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False) as client:
        for attempt in range(settings.webhook_attempts):
            if attempt:
                await asyncio.sleep(2 ** (attempt - 1))
            try:
                pinned = destination.request_args()  # to the checked address only
                pinned["headers"]["content-type"] = "application/json"
                response = await client.post(content=body.model_dump_json(), **pinned)
            except httpx.HTTPError as exc:
                logger.warning("webhook for %s, attempt %d: %s", body.request_id, attempt + 1, describe_failure(exc))
                continue
            if response.is_success:
                return True
            logger.warning("webhook for %s, attempt %d: HTTP %d", body.request_id, attempt + 1, response.status_code)
    return False
