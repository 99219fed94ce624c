"""Audio in an S3-compatible bucket: `POSTCALL_AUDIO_STORE=s3://bucket/prefix` (AWS, MinIO, R2, SeaweedFS…).

Client: boto3, every call in a worker thread (the callers already run blob work off the event loop). It gives the
two calls this needs without buffering a file — multipart upload with parts of our own size (PART_BYTES, the one
buffer a write holds) and ranged GETs read in chunks — speaks to every S3-compatible store, and takes credentials
and region from the standard `AWS_*` chain. Timeouts and one retry are set so a store that does not answer fails a
call within CALL_BOUND_SECONDS: an audio webhook then gets 503 in time and its sender retries.

Layout under the prefix:
    audio/<id>.mp3         the same relative paths as the file store, so `postcall audio copy` moves them as is
    tmp/<ms>-<hex>.part    a staged upload (its name carries its age): parts go up as they are written; `sync()`
                           completes it
    claims/<ms>-<hex>      written before a staged object is copied to its audio/ key inside the record's
                           transaction, deleted once that transaction has committed

Crashes. Start-up settles what writers that died left behind: a claim (the copy happened, the commit may not have)
removes its audio object unless a committed record says it is there; staged objects and unfinished multipart
uploads are removed (`clean_temp`). A bucket has no locks to tell a dead writer from a live one on another replica,
so only what is older than `grace` (default STALE_TEMP_SECONDS; `?grace=SECONDS` in the store URL) is settled.

Deleting. A conversation's audio always lives at the same key, so a purge (or erase) that decides after its own
commit to delete `audio/<id>.mp3` could delete a newer object that a writer copied there meanwhile and whose record
then commits. A bucket has no locks, but every replica shares the database, so the path lock the file store takes
with flock is a lock of the database here (`path_lock_id`): a writer takes it inside its transaction before the copy
and holds it until that transaction ends (PostgreSQL `pg_advisory_xact_lock`); a deleter takes it around asking
whether a committed record claims the key and deleting (`pg_advisory_lock` … `unlock` on its own transaction's
connection), so a writer in flight makes it wait for the commit, after which the record claims the object. On
SQLite every writer and deleter already holds the database's one write lock for its whole transaction. Lock order
as in the file store: the path lock before the conversation's row (commit() comes before record.store.apply).
Start-up's settle runs outside any transaction and takes no lock: it only settles claims older than the grace.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import sqlalchemy as sa
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.storage.audio import (
    TEMP_SUFFIX,
    AudioStoreError,
    BlobStore,
    TempBlob,
    audio_relpath,
)
from service.storage.db import after_commit, current_connection
from service.storage.s3_location import S3Location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

PART_BYTES = 8 * 1024 * 1024  # S3's smallest part is 5 MiB (but the last); each write holds at most this much
READ_BYTES = 1024 * 1024  # what a ranged GET reads from the response at a time: the one buffer a read holds
CONNECT_TIMEOUT_SECONDS = 3
READ_TIMEOUT_SECONDS = 10
ATTEMPTS = 2
CALL_BOUND_SECONDS = ATTEMPTS * (CONNECT_TIMEOUT_SECONDS + READ_TIMEOUT_SECONDS)  # 26 s, within the 30 s promised
T = TypeVar("T")
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}


def make_client(endpoint_url: str | None) -> S3Client:
    """A client with bounded calls; credentials and region from the `AWS_*` chain (region us-east-1 if none)."""
    session = boto3.session.Session()
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        retries={"total_max_attempts": ATTEMPTS, "mode": "standard"},
        max_pool_connections=32,
        # Path-style addressing works on every S3-compatible store; AWS keeps virtual hosts by default.
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    return session.client(
        "s3", endpoint_url=endpoint_url, region_name=session.region_name or "us-east-1", config=config
    )


# The first key of PostgreSQL's two-key advisory locks: a namespace of our own for audio paths ("PCAU").
PATH_LOCK_CLASS = 0x50434155
_LOCK_FOR_TRANSACTION = sa.text("SELECT pg_advisory_xact_lock(:space, :path)")
_LOCK = sa.text("SELECT pg_advisory_lock(:space, :path)")
_UNLOCK = sa.text("SELECT pg_advisory_unlock(:space, :path)")


def path_lock_id(bucket: str, key: str) -> int:
    """The second key of the lock of one object: a signed 32-bit hash of where it is. Two keys that share it wait
    for each other, which only costs time."""
    digest = hashlib.sha256(f"{bucket}/{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


def _locking_connection() -> sa.Connection | None:
    """The enclosing transaction's connection where path locks are needed (PostgreSQL); None on SQLite, whose
    transactions hold the one write lock from their start, and outside a transaction."""
    conn = current_connection()
    return conn if conn is not None and conn.dialect.name == "postgresql" else None


def lock_for_transaction(bucket: str, key: str) -> None:
    """Hold the lock of `key` until the enclosing transaction ends (a writer, before it copies into place)."""
    conn = _locking_connection()
    if conn is not None:
        conn.execute(_LOCK_FOR_TRANSACTION, {"space": PATH_LOCK_CLASS, "path": path_lock_id(bucket, key)})


@contextlib.contextmanager
def path_locked(bucket: str, key: str) -> Iterator[None]:
    """Hold the lock of `key` for the block (a deleter, which may delete thousands in one transaction: each lock
    is let go as soon as its object is decided, so no writer waits for the rest of the batch)."""
    conn = _locking_connection()
    if conn is None:
        yield
        return
    ids = {"space": PATH_LOCK_CLASS, "path": path_lock_id(bucket, key)}
    conn.execute(_LOCK, ids)
    try:
        yield
    finally:
        try:
            conn.execute(_UNLOCK, ids)
        except sa.exc.DBAPIError:
            # A session lock outlives a rolled-back transaction, and an aborted one cannot run the unlock: ending
            # the session is what lets go of it, rather than a pooled connection holding it for good.
            conn.invalidate()


def _call(operation: str, call: Callable[..., T], **arguments: Any) -> T:
    """Run one S3 call; what fails becomes FileNotFoundError (no such key) or AudioStoreError (anything else).
    The message names the call and the error code, never a credential."""
    try:
        return call(**arguments)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        if code in _MISSING:
            raise FileNotFoundError(f"S3 {operation}: {code}") from None
        raise AudioStoreError(f"S3 {operation} refused: {code}") from None
    except BotoCoreError as exc:
        raise AudioStoreError(f"S3 {operation} failed: {type(exc).__name__}") from None


class S3TempBlob(TempBlob):
    """A staged upload. Parts of PART_BYTES go up as they are written; `sync()` completes the object at its
    tmp/ key; `commit()` copies it to the conversation's key (server-side) inside the record's transaction."""

    def __init__(self, store: S3Store) -> None:  # no super().__init__: nothing of it is on local disk
        self._s3 = store
        self.key = store.key(f"tmp/{_stamped()}{TEMP_SUFFIX}")
        self.path = Path(self.key)
        self.size = 0
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._synced = False
        self._committed = False
        self._claim_key: str | None = None
        self._final_key: str | None = None  # where commit() copied it, for withdraw()
        self._settled = False

    def write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= PART_BYTES:
            self._send_part()

    def _send_part(self) -> None:
        client, bucket = self._s3.client, self._s3.location.bucket
        if self._upload_id is None:
            started = _call(
                "CreateMultipartUpload", lambda: client.create_multipart_upload(Bucket=bucket, Key=self.key)
            )
            self._upload_id = started["UploadId"]
        upload_id, number = self._upload_id, len(self._parts) + 1
        data, self._buffer = bytes(self._buffer), bytearray()
        answer = _call(
            "UploadPart",
            lambda: client.upload_part(Bucket=bucket, Key=self.key, UploadId=upload_id, PartNumber=number, Body=data),
        )
        self._parts.append({"ETag": answer["ETag"], "PartNumber": number})

    def sync(self) -> None:
        """Complete the staged object; it takes no more writes."""
        if self._synced:
            return
        client, bucket = self._s3.client, self._s3.location.bucket
        if self._upload_id is None:
            data = bytes(self._buffer)
            _call("PutObject", lambda: client.put_object(Bucket=bucket, Key=self.key, Body=data))
        else:
            if self._buffer:
                self._send_part()
            upload_id, parts = self._upload_id, self._parts
            _call(
                "CompleteMultipartUpload",
                lambda: client.complete_multipart_upload(
                    Bucket=bucket, Key=self.key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                ),
            )
        self._buffer = bytearray()
        self._synced = True

    def commit(self, conversation_id: str) -> str:
        """Copy the staged object to the conversation's key; call it inside the `db.transaction` that records it.
        A claim written first lets start-up remove the copy if that transaction never commits."""
        relpath = audio_relpath(conversation_id)
        self.sync()
        client, bucket = self._s3.client, self._s3.location.bucket
        final = self._s3.key(relpath)
        lock_for_transaction(bucket, final)  # waits while a purge decides about this key
        claim_key = self._s3.key(f"claims/{_stamped()}")
        _call("PutObject", lambda: client.put_object(Bucket=bucket, Key=claim_key, Body=relpath.encode()))
        self._claim_key = claim_key
        _call(
            "CopyObject",
            lambda: client.copy_object(Bucket=bucket, Key=final, CopySource={"Bucket": bucket, "Key": self.key}),
        )
        self._committed = True
        self._final_key = final
        after_commit(self._settle)
        return relpath

    def withdraw(self) -> None:
        """Take the copy back out of place before the transaction commits, because that transaction found its
        conversation erased meanwhile (record/store.py); the key's lock, held since `commit()`, keeps every other
        writer and deleter of it waiting until then. A store that refuses fails the transaction, whose claim then
        lets start-up remove the copy."""
        if self._final_key is not None:
            with contextlib.suppress(FileNotFoundError):
                self._s3.delete(self._final_key)
            self._final_key = None

    def place(self, relpath: str) -> None:
        """Copy the staged object to `relpath` outside any record's transaction (`postcall audio copy`: the record
        already names that path), then remove the staged object."""
        self.sync()
        client, bucket = self._s3.client, self._s3.location.bucket
        _call(
            "CopyObject",
            client.copy_object,
            Bucket=bucket,
            Key=self._s3.key(relpath),
            CopySource={"Bucket": bucket, "Key": self.key},
        )
        self._committed = True
        self._settle()

    def _settle(self) -> None:
        """The record committed: the claim and the staged object are no longer needed. A store that fails now
        leaves them to start-up, which keeps the audio (a record claims it)."""
        self._settled = True
        for key in (self._claim_key, self.key):
            if key is not None:
                with contextlib.suppress(OSError):
                    self._s3.delete(key)

    def discard(self) -> None:
        """Abort or remove the staged upload. Never raises: it runs on error paths. A commit whose transaction
        failed keeps its claim, for start-up to settle."""
        if self._settled:
            return
        client, bucket, upload_id = self._s3.client, self._s3.location.bucket, self._upload_id
        with contextlib.suppress(OSError):
            if upload_id is not None and not self._synced:
                _call(
                    "AbortMultipartUpload",
                    lambda: client.abort_multipart_upload(Bucket=bucket, Key=self.key, UploadId=upload_id),
                )
            elif self._synced:
                self._s3.delete(self.key)
        self._buffer = bytearray()
        self._settled = True


class _S3Reader:
    """Ranged GETs of one object, read in chunks: never the whole object in memory."""

    def __init__(self, store: S3Store, key: str) -> None:
        self._store = store
        self._key = key
        head = _call("HeadObject", lambda: store.client.head_object(Bucket=store.location.bucket, Key=key))
        self.size = int(head["ContentLength"])
        self._etag = head.get("ETag", "")

    def chunks(self, start: int, length: int, chunk_bytes: int) -> Iterator[bytes]:
        if length <= 0:
            return
        client, bucket = self._store.client, self._store.location.bucket
        wanted = f"bytes={start}-{start + length - 1}"
        # IfMatch: a range of the object we measured, not of one stored again since.
        answer = _call(
            "GetObject", lambda: client.get_object(Bucket=bucket, Key=self._key, Range=wanted, IfMatch=self._etag)
        )
        body = answer["Body"]
        try:
            while True:
                # Read big, hand out small: each read of the response has a fixed cost. 1 MiB reads took serve's
                # CPU for an 84 MB `/audio` from 0.26-0.29 s to 0.22 s (tests/bench/s3_audio.py, moto).
                block = _call("GetObject", lambda: body.read(max(chunk_bytes, READ_BYTES)))
                if not block:
                    return
                for offset in range(0, len(block), chunk_bytes):
                    yield block[offset : offset + chunk_bytes]
        finally:
            body.close()

    def close(self) -> None:
        pass


class S3Store(BlobStore):
    """Audio in a bucket; webhook spills stay in the data dir's tmp/ (see BlobStore)."""

    def __init__(self, location: S3Location, data_dir: Path, client: S3Client) -> None:
        super().__init__(data_dir)
        self.location = location
        self.client = client

    def describe(self) -> str:
        return f"the bucket {self.location.url()}"

    def key(self, relpath: str) -> str:
        return self.location.prefix + relpath

    def delete(self, key: str) -> None:
        _call("DeleteObject", lambda: self.client.delete_object(Bucket=self.location.bucket, Key=key))

    def probe(self) -> None:
        """Raise OSError unless the data dir takes a spill file and the bucket takes (and deletes) an object."""
        super().probe()
        key = self.key(f"tmp/{_stamped()}.probe")
        _call("PutObject", lambda: self.client.put_object(Bucket=self.location.bucket, Key=key, Body=b""))
        self.delete(key)

    def open_temp(self) -> TempBlob:
        return S3TempBlob(self)

    def open_audio(self, relpath: str) -> _S3Reader:
        return _S3Reader(self, self.key(relpath))

    def list_audio(self) -> Iterator[str]:
        for key, _ in self._objects("audio/"):
            yield key.removeprefix(self.location.prefix)

    def object_size(self, relpath: str) -> int | None:
        """The size of the object at `relpath`; None when there is none."""
        try:
            head = _call(
                "HeadObject", lambda: self.client.head_object(Bucket=self.location.bucket, Key=self.key(relpath))
            )
        except FileNotFoundError:
            return None
        return int(head["ContentLength"])

    def remove_unclaimed(self, relpath: str, is_claimed: Callable[[str], bool]) -> bool | None:
        """As the file store's, deciding under the key's lock (see "Deleting" above): call it inside the
        transaction whose connection `is_claimed` reads with."""
        key = self.key(relpath)
        with path_locked(self.location.bucket, key):
            if is_claimed(relpath):
                return None
            if self.object_size(relpath) is None:
                return False
            self.delete(key)
            return True

    def settle_claims(self, is_claimed: Callable[[str], bool], older_than_seconds: float | None = None) -> int:
        """Settle the claims older than the grace: remove each audio object no committed record claims."""
        removed = 0
        for key, _ in self._objects("claims/", older_than_seconds):
            try:
                body = _call("GetObject", self.client.get_object, Bucket=self.location.bucket, Key=key)
            except FileNotFoundError:
                continue  # settled by another replica meanwhile
            relpath = body["Body"].read(4096).decode(errors="replace")
            if relpath.startswith("audio/") and not is_claimed(relpath):
                self.delete(self.key(relpath))
                removed += 1
            self.delete(key)
        return removed

    def clean_temp(self, older_than_seconds: float | None = None) -> int:
        """Remove staged objects and abort unfinished uploads older than the grace; local spills as the file
        store does."""
        removed = super().clean_temp()
        for key, _ in self._objects("tmp/", older_than_seconds):
            self.delete(key)
            removed += 1
        cutoff = self._cutoff(older_than_seconds)
        paginator = self.client.get_paginator("list_multipart_uploads")
        pages = paginator.paginate(Bucket=self.location.bucket, Prefix=self.key("tmp/"))
        for page in _call("ListMultipartUploads", lambda: list(pages)):
            for upload in page.get("Uploads", []):
                if _written_before(upload["Key"], cutoff):
                    with contextlib.suppress(FileNotFoundError):
                        _call(
                            "AbortMultipartUpload",
                            self.client.abort_multipart_upload,
                            Bucket=self.location.bucket,
                            Key=upload["Key"],
                            UploadId=upload["UploadId"],
                        )
                    removed += 1
        return removed

    def _cutoff(self, older_than_seconds: float | None) -> float:
        grace = self.location.grace_seconds if older_than_seconds is None else older_than_seconds
        return time.time() - grace

    def _objects(self, under: str, older_than_seconds: float | None = None) -> Iterator[tuple[str, int]]:
        """(key, size) of the objects under `under`; with `older_than_seconds` (None: the grace) only older ones,
        without it when `under` is audio/ (every one)."""
        cutoff = self._cutoff(older_than_seconds) if under != "audio/" else None
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.location.bucket, Prefix=self.key(under)))
        while (page := _call("ListObjectsV2", lambda: next(pages, None))) is not None:
            for item in page.get("Contents", []):
                if cutoff is None or _written_before(item["Key"], cutoff):
                    yield item["Key"], int(item["Size"])


def _stamped() -> str:
    """A new key name that says when it was written: start-up reads ages from names, not from the store's
    LastModified/Initiated, which some S3-compatible servers do not report truly (moto's uploads say 2010)."""
    return f"{time.time_ns() // 1_000_000:013d}-{uuid.uuid4().hex}"


def _written_before(key: str, cutoff: float) -> bool:
    """Whether the key (named by `_stamped`) was written before `cutoff`; a name without a stamp is old."""
    stamp = key.rpartition("/")[2].partition("-")[0]
    return not stamp.isdigit() or int(stamp) / 1000 <= cutoff


def sha256_of(reader: Any, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a whole stored object (an AudioReader), read in chunks."""
    digest = hashlib.sha256()
    for chunk in reader.chunks(0, reader.size, chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()
