"""Large queue inputs and results kept in object storage instead of the record.

An image-to-image input carries its image as a data URI (up to ~33 MB) and a `sync_mode` result
its images; stored inline, every status poll and every store round trip would move them. Above
`inline_max_bytes` they go to the storage layer and the record keeps the payload's name. A
payload whose record is gone (expired, deleted, or never enqueued) is removed by `sweep`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from server.errors import ServiceError
from server.queue.store import Completion, RequestRecord, RequestStore
from server.storage import ObjectStore, StorageError

# A payload is written just before its record: younger ones may not have a record yet.
SWEEP_GRACE_S = 60.0


class Payloads:
    def __init__(self, storage: ObjectStore, inline_max_bytes: int, grace_s: float = SWEEP_GRACE_S) -> None:
        self.storage = storage
        self.inline_max_bytes = inline_max_bytes
        self.grace_s = grace_s

    async def _offload(self, request_id: str, kind: str, value: Any) -> str | None:
        """The payload name when `value` is too large to keep inline, else None."""
        encoded = json.dumps(value).encode()
        if len(encoded) <= self.inline_max_bytes:
            return None
        return await asyncio.to_thread(self.storage.put_payload, request_id, kind, encoded)

    async def _load(self, name: str) -> Any:
        try:
            return json.loads(await asyncio.to_thread(self.storage.get_payload, name))
        except StorageError as exc:
            raise ServiceError(f"The request's stored payload is unavailable: {exc}", 503, "storage_error") from exc

    async def store_input(self, request_id: str, data: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """(inline input, payload name): exactly one of them is set."""
        ref = await self._offload(request_id, "input", data)
        return (None, ref) if ref else (data, None)

    async def load_input(self, record: RequestRecord) -> dict[str, Any]:
        return record.input if record.input is not None else await self._load(record.input_ref)

    async def store_result(self, request_id: str, completion: Completion) -> Completion:
        """The completion to keep in the record: its body replaced by a payload name when large."""
        ref = await self._offload(request_id, "result", completion.body)
        return completion.model_copy(update={"body": None, "body_ref": ref}) if ref else completion

    async def load_result(self, record: RequestRecord) -> Any:
        return await self._load(record.result_ref) if record.result_ref else record.result

    async def delete(self, names: list[str]) -> None:
        if names:
            await asyncio.to_thread(self.storage.delete_payloads, names)

    async def sweep(self, store: RequestStore) -> int:
        """Remove the payloads whose record no longer exists; returns how many went."""
        now = time.time()
        gone = []
        for name, created, request_id in await asyncio.to_thread(self.storage.payloads):
            if now - created > self.grace_s and await store.get(request_id, logs=False) is None:
                gone.append(name)
        await self.delete(gone)
        return len(gone)
