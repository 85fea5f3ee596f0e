"""Output images and queue payloads on any fsspec filesystem: a local folder (the default) or
object storage (`s3://bucket/prefix` through s3fs, or any other fsspec URL).

Keys under the root:
- `files/<expires>-<32 hex>.<ext>`: an output image. `<expires>` is the Unix time after which the
  sweeper removes it, so retention needs no index and no per-object metadata read: every
  ingress replica can sweep any backend from a listing alone.
- `payloads/<created>-<request id>.<kind>.json`: a queued request's large input or result body,
  kept out of the queue record; removed once the record is gone (`sweep_payloads`).

Every method here blocks (file or network I/O): callers on an event loop use `asyncio.to_thread`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from settings import Settings

logger = logging.getLogger(__name__)

OUTPUT_NAME = re.compile(r"^(?P<expires>\d{10})-[0-9a-f]{32}\.(?P<ext>jpeg|png)$")
PAYLOAD_NAME = re.compile(r"^(?P<created>\d{10})-(?P<request_id>[0-9a-f-]{36})\.(?P<kind>input|result)\.json$")
PayloadKind = Literal["input", "result"]


class StorageError(Exception):
    """Writing or reading an object failed; the message is safe to return to the client."""


@dataclass
class SweepReport:
    expired: int = 0  # outputs past their time to live
    evicted: int = 0  # outputs removed early to keep the local folder under its size cap
    evicted_bytes: int = 0


class ObjectStore:
    """One root on one fsspec filesystem, shared by every ingress replica that points at it."""

    def __init__(
        self,
        url: str,
        options: dict[str, Any] | None = None,
        *,
        public_base_url: str | None = None,
        presign_ttl_s: float = 3600.0,
        default_ttl_s: float = 7 * 24 * 3600.0,
        max_bytes: int | None = None,
    ) -> None:
        self.fs, root = fsspec.core.url_to_fs(url, **_with_sigv4(url, options or {}))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/")
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.presign_ttl_s = presign_ttl_s
        self.default_ttl_s = default_ttl_s
        self.max_bytes = max_bytes
        if self.is_local:
            for folder in ("files", "payloads"):
                Path(self.root, folder).mkdir(parents=True, exist_ok=True)

    def _key(self, folder: str, name: str) -> str:
        return f"{self.root}/{folder}/{name}"

    def _write(self, key: str, data: bytes) -> None:
        try:
            if self.is_local:  # a rename publishes the whole file at once: no half-written output is served
                partial = f"{key}.{uuid.uuid4().hex}.partial"
                self.fs.pipe_file(partial, data)
                self.fs.mv(partial, key)
            else:  # one PUT: object stores never show a partial object
                self.fs.pipe_file(key, data)
        except Exception as exc:
            raise StorageError(f"could not write to output storage ({type(exc).__name__})") from exc

    # ---------------------------------------------------------------- outputs

    def save_output(self, data: bytes, extension: str, ttl_s: float | None = None) -> str:
        """Store an output image for `ttl_s` (default: the store's); returns its name."""
        expires = int(time.time() + (ttl_s if ttl_s is not None else self.default_ttl_s))
        name = f"{expires:010d}-{uuid.uuid4().hex}.{extension}"
        self._write(self._key("files", name), data)
        return name

    def output_url(self, name: str, base: str) -> str:
        """Where a client fetches an output: under the public base, a presigned URL, or this server's
        `/files/<name>` (`base` is the scheme and host the client used)."""
        if self.public_base_url:
            return f"{self.public_base_url}/files/{name}"
        if self.is_local:
            return f"{base}/files/{name}"
        expires_in = int(OUTPUT_NAME.match(name)["expires"]) - time.time()
        try:
            return self.fs.sign(self._key("files", name), expiration=max(1, int(min(self.presign_ttl_s, expires_in))))
        except Exception as exc:
            raise StorageError(f"could not sign an output URL ({type(exc).__name__})") from exc

    def local_path(self, name: str) -> Path | None:
        """The file of a live output name on local storage (None otherwise, or once expired)."""
        match = OUTPUT_NAME.match(name)
        if not self.is_local or match is None or int(match["expires"]) < time.time():
            return None
        path = Path(self._key("files", name))
        return path if path.is_file() else None

    def read_output(self, name: str) -> bytes | None:
        """The bytes of a live output name (None for names this store never hands out, or expired)."""
        match = OUTPUT_NAME.match(name)
        if match is None or int(match["expires"]) < time.time():
            return None
        try:
            return self.fs.cat_file(self._key("files", name))
        except FileNotFoundError:
            return None

    def sweep_outputs(self, now: float | None = None) -> SweepReport:
        """Remove expired outputs; on local storage also the oldest ones beyond `max_bytes`."""
        now = time.time() if now is None else now
        report = SweepReport()
        live: list[tuple[float, int, str]] = []  # (written at, size, key)
        for key, info in self.fs.find(f"{self.root}/files", detail=True).items():
            name = key.rsplit("/", 1)[-1]
            match = OUTPUT_NAME.match(name)
            if match is None:
                if name.endswith(".partial") and now - _mtime(info, now) > 3600:
                    self.fs.rm_file(key)  # left by a replica killed mid-write
                continue
            if int(match["expires"]) < now:
                self._remove(key)
                report.expired += 1
            else:
                live.append((_mtime(info, now), int(info.get("size") or 0), key))
        if self.is_local and self.max_bytes is not None:
            total = sum(size for _, size, _ in live)
            for _, size, key in sorted(live):
                if total <= self.max_bytes:
                    break
                self._remove(key)
                total -= size
                report.evicted += 1
                report.evicted_bytes += size
            if report.evicted:
                logger.warning("output storage over its %d-byte cap (SRPO_STORAGE_MAX_BYTES): removed the %d "
                               "oldest output(s), %d bytes, before they expired", self.max_bytes, report.evicted,
                               report.evicted_bytes)
        return report

    def _remove(self, key: str) -> None:
        try:
            self.fs.rm_file(key)
        except FileNotFoundError:  # another replica swept it first
            pass

    # ---------------------------------------------------------------- payloads

    def put_payload(self, request_id: str, kind: PayloadKind, data: bytes) -> str:
        name = f"{int(time.time()):010d}-{request_id}.{kind}.json"
        self._write(self._key("payloads", name), data)
        return name

    def get_payload(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self._key("payloads", name))
        except Exception as exc:
            raise StorageError(f"could not read a stored payload ({type(exc).__name__})") from exc

    def delete_payloads(self, names: Iterable[str]) -> None:
        for name in names:
            self._remove(self._key("payloads", name))

    def payloads(self) -> list[tuple[str, float, str]]:
        """(name, created at, request id) of every stored payload."""
        found = []
        for key in self.fs.find(f"{self.root}/payloads"):
            name = key.rsplit("/", 1)[-1]
            if match := PAYLOAD_NAME.match(name):
                found.append((name, float(match["created"]), match["request_id"]))
        return found


def _with_sigv4(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """S3 options that presign with Signature Version 4 unless they name another: botocore's default
    for presigned URLs is still Version 2 in some regions, which R2 and newer AWS regions refuse."""
    if fsspec.utils.get_protocol(url) not in ("s3", "s3a"):
        return options
    config = options.get("config_kwargs", {})
    return options | {"config_kwargs": {"signature_version": "s3v4", **config}}


def open_object_store(settings: Settings) -> ObjectStore:
    """The store the settings select: `storage_url` when set, else the local `storage_dir`."""
    return ObjectStore(
        settings.storage_url or str(Path(settings.storage_dir).absolute()),
        settings.storage_options,
        public_base_url=settings.storage_public_base_url,
        presign_ttl_s=settings.storage_presign_ttl_s,
        default_ttl_s=settings.output_ttl_s,
        max_bytes=settings.storage_max_bytes,
    )


def _mtime(info: dict[str, Any], default: float) -> float:
    if "mtime" in info:  # local
        return float(info["mtime"])
    modified = info.get("LastModified") or info.get("last_modified")  # s3fs and friends
    return modified.timestamp() if hasattr(modified, "timestamp") else default
