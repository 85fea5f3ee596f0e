"""Output images on local disk, under unguessable names, served by the ingress at /files/<name>."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

NAME_PATTERN = re.compile(r"^[0-9a-f]{32}\.(jpeg|png)$")


class ImageStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, extension: str) -> str:
        name = f"{uuid.uuid4().hex}.{extension}"
        tmp = self.folder / f".{name}.partial"
        tmp.write_bytes(data)
        tmp.replace(self.folder / name)  # never serve half a file
        return name

    def path(self, name: str) -> Path | None:
        """The file for a served name, or None for names this store never hands out."""
        if not NAME_PATTERN.match(name):
            return None
        path = self.folder / name
        return path if path.is_file() else None
