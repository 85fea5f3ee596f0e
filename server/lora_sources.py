"""Where a request's LoRA comes from, brought to a local file once per node (the disk tier).

A `path` is one of:
- an http(s) URL: fetched through the outbound guard (every redirect hop checked, the checked
  address connected to), size-capped, into the disk cache;
- an `s3://` (or any other fsspec) URL: read with the storage credentials (`SRPO_STORAGE_OPTIONS`);
- a Hugging Face repo id, `owner/name` or `owner/name/file.safetensors`: through huggingface_hub
  (its cache, `HF_TOKEN`, `HF_HUB_OFFLINE`);
- a file name in `SRPO_LORA_DIR` (with or without `.safetensors`), never outside it.
Fetched files land in `SRPO_LORA_CACHE_DIR` under a name derived from the path, written
atomically and kept in a least-recently-used cache capped in bytes; concurrent requests for one
path (in one process, or in several on the node) fetch it once. A file is known by the sha256 of
its bytes, so the same LoRA under two paths is one adapter.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import fsspec
import httpx
from filelock import FileLock

from api.schemas import LoraWeight
from models.request import LoraRef
from server.errors import InputError, ServiceError
from server.outbound import FetchError, describe_failure, guarded_get, limited_chunks
from settings import Settings

HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+\.safetensors)?$")
URL_SETTING = "SRPO_LORA_URL_ALLOWED_NETWORKS"
HEADER_MAX_BYTES = 100 * 1024 * 1024  # safetensors' own limit on its JSON header


def lora_error(path: str, message: str) -> InputError:
    return InputError(f"LoRA {path}: {message}")


@dataclass(frozen=True)
class LoraHeader:
    """What a safetensors header says without reading the tensors."""

    rank: int  # the largest rank among its low-rank pairs


def read_header(file: Path) -> LoraHeader:
    """ValueError unless `file` is a safetensors file; its largest LoRA rank."""
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > HEADER_MAX_BYTES:
            raise ValueError("not a safetensors file")
        raw = f.read(length)
    if not raw.startswith(b"{"):
        kind = "a pickle" if head[:1] == b"\x80" or head[:2] == b"PK" else "not a safetensors file"
        raise ValueError(f"{kind}: only .safetensors LoRAs are loaded")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ValueError("not a safetensors file (unreadable header)") from exc
    ranks = [info["shape"][0] for key, info in header.items()
             if key != "__metadata__" and any(m in key for m in ("lora_A", "lora_down", ".down.")) and info.get("shape")]
    return LoraHeader(rank=max(ranks, default=0))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class LoraSources:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache_dir = settings.lora_cache_dir
        self._locks: dict[str, asyncio.Lock] = {}
        self._digests: dict[tuple[str, int, int], str] = {}  # (file, size, mtime) -> sha256

    async def resolve_all(self, loras: Sequence[LoraWeight]) -> tuple[LoraRef, ...]:
        """Each LoRA as a local file with its identity, checked against this deployment's limits."""
        refs = []
        total_rank = 0
        for lora in loras:
            file = await self.local_file(lora.path)
            try:
                header = await asyncio.to_thread(read_header, file)
            except (ValueError, OSError) as exc:
                raise lora_error(lora.path, str(exc)) from exc
            total_rank += header.rank
            refs.append(LoraRef(lora.path, str(file), await asyncio.to_thread(self.digest, file), lora.scale))
        if total_rank > self.settings.lora_max_rank:
            raise InputError(f"the LoRAs' ranks add up to {total_rank}; this deployment serves at most "
                             f"{self.settings.lora_max_rank} (SRPO_LORA_MAX_RANK)")
        return tuple(refs)

    def digest(self, file: Path) -> str:
        stat = file.stat()
        key = (str(file), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = _sha256(file)
        return self._digests[key]

    async def local_file(self, path: str) -> Path:
        """A local file holding the LoRA `path` names; InputError (504 for a fetch timeout) otherwise."""
        if path.startswith(("http://", "https://")) or re.match(r"^[a-z][a-z0-9+.-]*://", path):
            return await self._cached(path)
        if (local := self._in_lora_dir(path)) is not None:
            return local
        if HF_REPO.match(path):
            return await self._from_hub(path)
        raise lora_error(path, "not found: a path is an https URL, an s3:// (fsspec) URL, a Hugging Face repo id "
                               "(owner/name[/file.safetensors]) or a file name in SRPO_LORA_DIR")

    def _check_size(self, path: str, size: int) -> None:
        if size > self.settings.lora_max_file_bytes:
            raise lora_error(path, f"file of {size} bytes is larger than {self.settings.lora_max_file_bytes} "
                                   f"(SRPO_LORA_MAX_FILE_BYTES)")

    def _in_lora_dir(self, path: str) -> Path | None:
        folder = self.settings.lora_dir
        if folder is None or "://" in path:
            return None
        root = folder.resolve()
        for name in (path, f"{path}.safetensors"):
            candidate = (root / name).resolve()
            if not candidate.is_relative_to(root):
                raise lora_error(path, "names a file outside the LoRA folder (SRPO_LORA_DIR)")
            if candidate.is_file():
                self._check_size(path, candidate.stat().st_size)
                return candidate
        return None

    async def _from_hub(self, path: str) -> Path:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        owner, name, *rest = path.split("/")
        repo, filename = f"{owner}/{name}", "/".join(rest) or None
        try:
            if filename is not None:
                file = Path(await asyncio.to_thread(huggingface_hub.hf_hub_download, repo, filename))
            else:
                folder = Path(await asyncio.to_thread(huggingface_hub.snapshot_download, repo,
                                                      allow_patterns=["*.safetensors"]))
                found = sorted(folder.rglob("*.safetensors"))
                if len(found) != 1:
                    names = ", ".join(str(f.relative_to(folder)) for f in found[:4]) or "none"
                    raise lora_error(path, f"the repo has {len(found)} .safetensors files ({names}): name one as "
                                           f"{repo}/<file>")
                file = found[0]
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
            raise lora_error(path, f"not available from the Hugging Face Hub or its cache ({type(exc).__name__})") from exc
        self._check_size(path, file.stat().st_size)
        return file

    async def _cached(self, path: str) -> Path:
        target = self.cache_dir / f"{hashlib.sha256(path.encode()).hexdigest()[:40]}.safetensors"
        lock = self._locks.setdefault(path, asyncio.Lock())
        async with lock:  # one fetch per path in this process; the file lock covers the node's others
            if target.is_file():
                os.utime(target)  # most recently used
                return target
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(target) + ".lock", timeout=self.settings.lora_fetch_timeout_s):
                if not target.is_file():
                    await self._fetch(path, target)
            await asyncio.to_thread(self._evict, keep=target)
            return target

    async def _fetch(self, path: str, target: Path) -> None:
        partial = target.with_suffix(f".part-{os.getpid()}")
        timeout_s = self.settings.lora_fetch_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                if path.startswith(("http://", "https://")):
                    await self._download(path, partial)
                else:
                    await asyncio.to_thread(self._copy_fsspec, path, partial)
            partial.replace(target)
        except TimeoutError as exc:
            raise ServiceError(f"LoRA {path}: download did not finish within {timeout_s:g} s "
                               f"(SRPO_LORA_FETCH_TIMEOUT_S)", 504, "request_timeout") from exc
        finally:
            partial.unlink(missing_ok=True)

    async def _download(self, url: str, partial: Path) -> None:
        limit = self.settings.lora_max_file_bytes
        too_large = f"file larger than {limit} bytes (SRPO_LORA_MAX_FILE_BYTES)"
        try:
            async with httpx.AsyncClient(follow_redirects=False, timeout=self.settings.lora_fetch_timeout_s) as client:
                async with guarded_get(client, url, self.settings.lora_url_allowed_networks, URL_SETTING) as response:
                    with partial.open("wb") as out:
                        async for chunk in limited_chunks(response, limit, too_large):
                            out.write(chunk)
        except FetchError as exc:
            raise lora_error(url, str(exc)) from exc
        except httpx.HTTPError as exc:
            raise lora_error(url, describe_failure(exc)) from exc

    def _copy_fsspec(self, url: str, partial: Path) -> None:
        try:
            fs, inner = fsspec.core.url_to_fs(url, **self.settings.storage_options)
            self._check_size(url, fs.size(inner))
            fs.get_file(inner, str(partial))
        except (FileNotFoundError, ValueError, ImportError, OSError) as exc:
            raise lora_error(url, f"cannot be read ({type(exc).__name__}: {exc})") from exc

    def _evict(self, keep: Path) -> None:
        files = sorted(self.cache_dir.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
        total = sum(f.stat().st_size for f in files)
        for file in files:
            if total <= self.settings.lora_disk_cache_bytes:
                break
            if file != keep:
                total -= file.stat().st_size
                file.unlink(missing_ok=True)
