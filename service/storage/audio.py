"""Audio files on disk: written under a temp name, synced, then renamed into place.

Layout under POSTCALL_DATA_DIR:
    tmp/*.part      files being written, each locked (flock) by its writer for as long as it lives
    tmp/*.claim     a note that a transaction is putting a file at <relpath>, locked by its writer; removed once
                    that transaction has committed
    locks/path-NN.lock  one of PATH_LOCK_STRIPES lock files, never removed: see "Deleting" below
    audio/<id>.mp3  a conversation whose id is plain ASCII letters, digits, '_' and '-'
    audio/_/<sha256 of id>.mp3   any other id, so no id can name a path outside the data dir

Crashes. A file is renamed into `audio/` inside the database transaction that records it, just before the
commit, so a process that dies between the two would leave a file that no record claims. The claim written before
the rename keeps that doubt on disk: at start-up `settle_claims` takes every claim no live process holds and keeps
its file only if a committed record says so; `clean_temp` then removes the temp files no live process holds. A
process that dies, even by SIGKILL, drops its locks; one that is alive (another replica, worker or the
reconciler, sharing the data dir) keeps them, so its work in progress is never touched.

Deleting. A conversation's audio always lives at the same path, so a deleter (purge) that decides after its own
commit to remove `audio/<id>.mp3` could remove a newer file that another transaction put there meanwhile and that a
committed record now claims. Hence every change at a path happens under that path's lock (flock on one of
PATH_LOCK_STRIPES files, chosen by the path's hash): a writer holds it from before its rename until its transaction
has committed or failed (`TempBlob.commit` to `Claim.settle`/`release`); a deleter takes it, then asks the
database whether a committed record claims the path, and unlinks only if none does (`remove_unclaimed`). A writer
in flight makes the deleter wait for its commit, after which its record claims the file; a writer that comes later
renames its file after the unlink. Lock order: a writer takes the path lock inside its transaction but before it
locks the conversation's row (commit() before record.store.apply), so two writers of one stripe never wait for
each other's row; on SQLite, whose writers hold the database's one write lock for their whole transaction, the
deleter also checks from inside a write transaction (so it cannot wait for a writer that waits for it). Where the
file system has no locks, nothing guards the path and a purge racing a write can lose that write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from service.storage.db import after_commit

_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
STALE_TEMP_SECONDS = 3600
TEMP_SUFFIX = ".part"
CLAIM_SUFFIX = ".claim"
PATH_LOCK_STRIPES = 64  # paths share lock files: few files, and two writes rarely wait on the same one


def audio_relpath(conversation_id: str) -> str:
    """Where a conversation's audio lives, relative to the data dir; never escapes it."""
    if _PLAIN_ID.fullmatch(conversation_id):
        return f"audio/{conversation_id}.mp3"
    digest = hashlib.sha256(conversation_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"audio/_/{digest}.mp3"


class AudioReader(Protocol):
    """One stored audio object opened for reading: its size, then byte ranges in bounded chunks."""

    size: int

    def chunks(self, start: int, length: int, chunk_bytes: int) -> Iterator[bytes]:
        """`length` bytes from `start`, at most `chunk_bytes` at a time (blocking: iterate in a worker thread)."""
        ...

    def close(self) -> None: ...


class AudioStoreError(OSError):
    """The audio store (a bucket) did not answer or refused; `strerror` says which call and why, never a secret."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class _FileReader:
    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.size = os.fstat(file.fileno()).st_size

    def chunks(self, start: int, length: int, chunk_bytes: int) -> Iterator[bytes]:
        self._file.seek(start)
        remaining = length
        while remaining > 0:
            chunk = self._file.read(min(chunk_bytes, remaining))
            if not chunk:
                return  # the file shrank under us; the client sees a short body rather than a hang
            remaining -= len(chunk)
            yield chunk

    def close(self) -> None:
        self._file.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PathLock:
    """The lock of one audio path (shared with the paths of the same stripe), held until `release()`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops its flock
            self._fd = -1

    def __enter__(self) -> PathLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Claim:
    """A locked note in tmp/: a file was put at `relpath` by a transaction that has not committed yet. It holds
    the path's lock too, so that no deleter decides about the path before that transaction's outcome is known."""

    def __init__(self, fd: int, path: Path, path_lock: PathLock) -> None:
        self._fd = fd
        self.path = path
        self._path_lock = path_lock

    def settle(self) -> None:
        """The transaction committed: the note is no longer needed."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        """Unlock; a note not settled stays for `BlobStore.settle_claims` (the commit failed, or its outcome is
        unknown)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._path_lock.release()


class TempBlob:
    """A file being written in tmp/, locked by its writer. `commit()` makes it durable under its final name;
    `discard()` removes it (and only unlocks it once committed)."""

    def __init__(self, store: BlobStore, file: BinaryIO, path: Path) -> None:
        self._store = store
        self._file = file
        self.path = path
        self.size = 0
        self._synced = False
        self._committed = False
        self._claim: Claim | None = None
        self._final: Path | None = None

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def sync(self) -> None:
        """Flush and fsync the data; the file takes no more writes. It stays open: its lock marks it as live."""
        if not self._synced:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._synced = True

    def commit(self, conversation_id: str) -> str:
        """Move the synced file to the conversation's audio path; returns that path relative to the data dir.

        Call it inside the `db.transaction` that records the audio: its claim is settled when that transaction
        commits, and after a crash before the commit `BlobStore.settle_claims` removes the file again."""
        relpath = audio_relpath(conversation_id)
        final = self._store.root / relpath
        final.parent.mkdir(parents=True, exist_ok=True)
        self.sync()
        path_lock = self._store.lock_path(relpath)  # waits while a purge decides about this path
        try:
            self._claim = self._store.claim(relpath, os.fstat(self._file.fileno()).st_ino, path_lock)
        except BaseException:
            path_lock.release()
            raise
        os.replace(self.path, final)
        self._committed = True
        self._final = final
        _fsync_dir(final.parent)
        after_commit(self._claim.settle)
        return relpath

    def withdraw(self) -> None:
        """Take a committed file back out of place before its transaction commits, because that transaction found
        it must not keep it (its conversation was erased meanwhile, record/store.py). The path's lock, held since
        `commit()`, keeps every other writer and deleter of the path waiting until then."""
        if self._final is not None:
            with contextlib.suppress(FileNotFoundError):
                self._final.unlink()
            self._final = None

    def discard(self) -> None:
        """Remove the temp file, or once committed only unlock it. Never raises: it runs on error paths."""
        if not self._committed:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)  # while still locked, so no cleaner races us for it
        # Closing flushes what is buffered, which fails on a full disk; the descriptor is closed regardless.
        with contextlib.suppress(OSError):
            self._file.close()
        if self._claim is not None:
            self._claim.release()


class BlobStore:
    """The audio store interface and its `file` backend: audio under the data dir. Every store keeps webhook
    spills under the data dir's tmp/; a bucket (storage/s3.py) overrides where the audio itself goes: staging
    (`open_temp`), reading (`open_audio`, `list_audio`), deleting (`remove_unclaimed`), start-up (`settle_claims`,
    `clean_temp`) and `probe`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return f"the data dir {self.root}"

    def open_audio(self, relpath: str) -> AudioReader:
        """The stored audio at `relpath`; FileNotFoundError when it is not there (ValueError for a bad path)."""
        return _FileReader(self.path_of(relpath).open("rb"))

    def list_audio(self) -> Iterator[str]:
        """Every stored audio path (relative to the data dir), in no particular order."""
        audio = self.root / "audio"
        for path in audio.rglob("*.mp3"):
            if path.is_file():
                yield path.relative_to(self.root).as_posix()

    @property
    def temp_dir(self) -> Path:
        return self.root / "tmp"

    def probe(self) -> None:
        """Raise OSError unless a file can be created in the data dir now (it is gone, read-only, out of inodes).
        The file has no name (O_TMPFILE where there is one) and is gone when closed: nothing to clean up."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self.temp_dir):
            pass

    def open_temp(self) -> TempBlob:
        """A new locked temp file. Raises OSError when the data dir cannot take it (full, read-only, gone)."""
        fd, path = _create_locked(self.temp_dir, TEMP_SUFFIX)
        return TempBlob(self, os.fdopen(fd, "wb"), path)

    def claim(self, relpath: str, inode: int, path_lock: PathLock) -> Claim:
        """Note, durably and before it happens, that the file `inode` is about to be put at `relpath`."""
        fd, path = _create_locked(self.temp_dir, CLAIM_SUFFIX, f"{relpath}\n{inode}\n".encode())
        return Claim(fd, path, path_lock)

    def lock_path(self, relpath: str) -> PathLock:
        """Wait for, then hold, the lock of `relpath` (see "Deleting" in the module's docstring)."""
        lock_file = self.path_lock_file(relpath)
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):  # no locks on some network file systems: nothing to hold
            fcntl.flock(fd, fcntl.LOCK_EX)
        return PathLock(fd)

    def path_lock_file(self, relpath: str) -> Path:
        """The file whose flock guards `relpath`: one of PATH_LOCK_STRIPES, by the path's hash."""
        digest = hashlib.sha256(relpath.encode("utf-8", "surrogatepass")).digest()
        return self.root / "locks" / f"path-{int.from_bytes(digest[:4], 'big') % PATH_LOCK_STRIPES:02d}.lock"

    def remove_unclaimed(self, relpath: str, is_claimed: Callable[[str], bool]) -> bool | None:
        """Remove the file at `relpath` unless a committed record claims it, deciding under the path's lock.

        True: removed; False: it was already gone; None: kept, because a write committed since the caller's
        decision put a file there that a record claims. `is_claimed` must read committed data (on SQLite, from
        inside a write transaction: see the module's docstring)."""
        with self.lock_path(relpath):
            if is_claimed(relpath):
                return None
            try:
                self.path_of(relpath).unlink()
            except FileNotFoundError:
                return False
            return True

    def settle_claims(self, is_claimed: Callable[[str], bool], older_than_seconds: float = STALE_TEMP_SECONDS) -> int:
        """Settle the claims of writers that died before their commit: each file stays only if `is_claimed(relpath)`
        (a committed record says its audio is there). Returns how many files were removed. Raises what
        `is_claimed` raises (the database is down): the claims then wait for the next start."""
        if not self.temp_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path in sorted(self.temp_dir.glob("*" + CLAIM_SUFFIX)):
            fd = _open_abandoned(path, cutoff)
            if fd is None:
                continue
            try:
                relpath, _, inode = os.read(fd, 4096).decode(errors="replace").partition("\n")
                # A claim cut short by the crash was never followed by its rename: nothing to undo.
                if inode.strip().isdigit() and not is_claimed(relpath):
                    removed += self._remove_if_same(relpath, int(inode))
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return removed

    def _remove_if_same(self, relpath: str, inode: int) -> bool:
        """Remove the file at `relpath` if it is still the one claimed, not a newer one put there since."""
        path = self.path_of(relpath)
        try:
            if os.stat(path).st_ino != inode:
                return False
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def path_of(self, relpath: str) -> Path:
        """The absolute path of a stored blob; refuses anything that would leave the data dir."""
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError("blob path escapes the data dir")
        return path

    def clean_temp(self, older_than_seconds: float = STALE_TEMP_SECONDS) -> int:
        """Remove temp files left by a crash: every `.part` file no live process holds locked, whatever its age.
        Where the file system has no locks only age tells: those older than `older_than_seconds` go."""
        if not self.temp_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path in self.temp_dir.glob("*" + TEMP_SUFFIX):
            fd = _open_abandoned(path, cutoff)
            if fd is not None:
                path.unlink(missing_ok=True)
                os.close(fd)
                removed += 1
        return removed


def _create_locked(directory: Path, suffix: str, content: bytes = b"") -> tuple[int, Path]:
    """A new file `*<suffix>` in `directory`, locked by us, holding `content` (synced).

    A cleaner starting in the instant between the creation and the lock may take the file for a leftover and
    remove it: a temp file's delivery then fails when the file is renamed into place (a 503, never a silent loss);
    a claim's write goes on without the claim's crash protection. A crash before `content` is synced leaves a claim
    cut short, read as one whose rename never happened: true, since the rename comes only after this returns."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, suffix=suffix)
    path = Path(name)
    try:
        with contextlib.suppress(OSError):  # no locks on some network file systems: cleaners then go by age
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if content:
            os.write(fd, content)
            os.fsync(fd)
            _fsync_dir(directory)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd, path


def _open_abandoned(path: Path, cutoff: float) -> int | None:
    """A locked descriptor of `path` if no live process holds it (on a file system without locks: if it is older
    than `cutoff`); None if it is in use or gone."""
    try:
        fd = os.open(path, os.O_RDWR)  # read-write: flock over NFS is a byte-range lock, which needs it
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # its writer is alive
    except OSError:
        if os.fstat(fd).st_mtime >= cutoff:
            os.close(fd)
            return None
    if not _same_file(path, fd):
        os.close(fd)
        return None  # committed (renamed away) after we opened it
    return fd


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
