"""`postcall audio copy --to s3://…`: every stored audio object into a bucket, verified, resumable.

Each object is hashed at the source, uploaded through a staged object, then read back and compared (size and
SHA-256) before it counts as copied. An object already at the target with the same size and SHA-256 is skipped, so
running the copy again after an interruption resumes where it stopped and never writes an object twice."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from service.storage.audio import AudioReader, BlobStore
from service.storage.s3 import S3Store, S3TempBlob

CHUNK_BYTES = 1 << 20


class CopyMismatch(Exception):
    """What the target holds after a copy is not what the source holds."""


@dataclass
class CopyReport:
    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0


def copy_audio(
    source: BlobStore, target: S3Store, on_object: Callable[[str], None] = lambda relpath: None
) -> CopyReport:
    """Copy every audio object of `source` to `target`; raises CopyMismatch or OSError on the first failure."""
    report = CopyReport()
    for relpath in sorted(source.list_audio()):
        size, digest = _measure(source, relpath)
        if _matches(target, relpath, size, digest):
            report.skipped += 1
        else:
            _upload(source, target, relpath)
            if not _matches(target, relpath, size, digest):
                raise CopyMismatch(f"{relpath}: the copy in {target.describe()} differs from the source")
            report.copied += 1
            report.bytes_copied += size
        on_object(relpath)
    return report


def count_audio(source: BlobStore) -> int:
    return sum(1 for _ in source.list_audio())


def _chunks(reader: AudioReader) -> Iterator[bytes]:
    return reader.chunks(0, reader.size, CHUNK_BYTES)


def _measure(store: BlobStore, relpath: str) -> tuple[int, str]:
    reader = store.open_audio(relpath)
    try:
        digest = hashlib.sha256()
        for chunk in _chunks(reader):
            digest.update(chunk)
        return reader.size, digest.hexdigest()
    finally:
        reader.close()


def _matches(target: S3Store, relpath: str, size: int, digest: str) -> bool:
    if target.object_size(relpath) != size:
        return False
    return _measure(target, relpath) == (size, digest)


def _upload(source: BlobStore, target: S3Store, relpath: str) -> None:
    reader = source.open_audio(relpath)
    blob = target.open_temp()
    assert isinstance(blob, S3TempBlob)
    try:
        for chunk in _chunks(reader):
            blob.write(chunk)
        blob.place(relpath)
    finally:
        blob.discard()
        reader.close()
