"""Audio files on disk: written under a temp name, synced, then renamed into place.

Layout under POSTCALL_DATA_DIR:
    tmp/            files being written; anything here after a crash is garbage (see `clean_temp`)
    audio/<id>.mp3  a conversation whose id is plain ASCII letters, digits, '_' and '-'
    audio/_/<sha256 of id>.mp3   any other id, so no id can name a path outside the data dir
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
STALE_TEMP_SECONDS = 3600


def audio_relpath(conversation_id: str) -> str:
    """Where a conversation's audio lives, relative to the data dir; never escapes it."""
    if _PLAIN_ID.fullmatch(conversation_id):
        return f"audio/{conversation_id}.mp3"
    digest = hashlib.sha256(conversation_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"audio/_/{digest}.mp3"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TempBlob:
    """A file being written in tmp/. `commit()` makes it durable under its final name; `discard()` removes it."""

    def __init__(self, store: BlobStore, file: BinaryIO, path: Path) -> None:
        self._store = store
        self._file = file
        self.path = path
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def sync(self) -> None:
        """Flush and fsync the data; the file takes no more writes."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def commit(self, conversation_id: str) -> str:
        """Move the synced file to the conversation's audio path; returns that path relative to the data dir."""
        relpath = audio_relpath(conversation_id)
        final = self._store.root / relpath
        final.parent.mkdir(parents=True, exist_ok=True)
        self.sync()
        os.replace(self.path, final)
        _fsync_dir(final.parent)
        return relpath

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def temp_dir(self) -> Path:
        return self.root / "tmp"

    def open_temp(self) -> TempBlob:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.temp_dir, suffix=".part")
        return TempBlob(self, os.fdopen(fd, "wb"), Path(name))

    def path_of(self, relpath: str) -> Path:
        """The absolute path of a stored blob; refuses anything that would leave the data dir."""
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError("blob path escapes the data dir")
        return path

    def delete(self, relpath: str) -> None:
        self.path_of(relpath).unlink(missing_ok=True)

    def clean_temp(self, older_than_seconds: float = STALE_TEMP_SECONDS) -> int:
        """Remove temp files left by a crash. Only old ones: another replica may share the data dir."""
        if not self.temp_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path in self.temp_dir.glob("*.part"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
