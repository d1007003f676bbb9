"""Blobs as files under a directory (the data directory by default). Writes are atomic (a temporary
file renamed into place), so a reader never sees half an image. Several API and worker processes
share blobs through a shared volume; an object store would take this adapter's place across machines."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from pathlib import Path

from keel.contexts.media.ports.storage import Blob

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_TYPE_SUFFIX = ".type"


class FilesystemBlobStore:
    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, key: str) -> Path:
        # Keys are built by Keel, never taken from a request; this still refuses "..", absolute paths.
        if not _KEY.match(key) or ".." in key.split("/"):
            raise ValueError(f"invalid blob key {key!r}")
        return self._root / key

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(self._put, self._path(key), data, content_type)

    @staticmethod
    def _put(path: Path, data: bytes, content_type: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, payload in ((path.with_name(path.name + _TYPE_SUFFIX), content_type.encode()), (path, data)):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(payload)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    async def get(self, key: str) -> Blob | None:
        return await asyncio.to_thread(self._get, self._path(key))

    @staticmethod
    def _get(path: Path) -> Blob | None:
        try:
            data = path.read_bytes()
            content_type = path.with_name(path.name + _TYPE_SUFFIX).read_text()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return Blob(data=data, content_type=content_type)

    async def delete_prefix(self, prefix: str) -> int:
        return await asyncio.to_thread(self._delete, self._path(prefix))

    @staticmethod
    def _delete(path: Path) -> int:
        if path.is_dir():
            count = sum(1 for p in path.rglob("*") if p.is_file() and not p.name.endswith(_TYPE_SUFFIX))
            shutil.rmtree(path, ignore_errors=True)
            return count
        return 0
