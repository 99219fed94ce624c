"""A purge racing an audio write of the same conversation never deletes audio a committed record claims (bucket).

The interleaving that lost it: the writer has copied its new audio to the conversation's key inside its transaction
and not committed yet; the purge, after its own batch committed, asks whether a committed record claims the key
(none does yet), deletes the object, and the writer commits a record claiming audio that is gone."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from service.config import Settings
from service.record import purge as retention
from service.record import store
from service.record.payloads import Source
from service.storage.audio import BlobStore, TempBlob, audio_relpath
from service.storage.db import StoreRefused, create_engine, is_sqlite, transaction
from service.storage.s3 import PATH_LOCK_CLASS, S3Store, make_client, path_lock_id, path_locked
from service.storage.stores import open_audio_store
from tests.support import records
from tests.support.records import get_record
from tests.support.s3 import new_bucket_name

pytestmark = pytest.mark.s3
CID = "conv_race"
OLD = b"ID3 the recording the purge removes"
NEW = b"ID3 a recording stored again while the purge runs"
BOUND_SECONDS = 30  # how long a step may take before the test gives up: a hang, not a measurement


@pytest.fixture
def blobs(settings: Settings, s3_endpoint: str) -> S3Store:
    bucket = new_bucket_name()
    make_client(s3_endpoint).create_bucket(Bucket=bucket)
    bucket_store = open_audio_store(
        settings.model_copy(update={"audio_store": f"s3://{bucket}/rec", "s3_endpoint_url": s3_endpoint})
    )
    assert isinstance(bucket_store, S3Store)
    return bucket_store


def put_audio(blobs: BlobStore, content: bytes) -> TempBlob:
    blob = blobs.open_temp()
    blob.write(content)
    blob.sync()
    return blob


def stored_audio(engine: Engine, blobs: BlobStore) -> bytes | None:
    """The audio the committed record claims, read from the bucket; None when it claims none."""
    with engine.connect() as conn:
        record = get_record(conn, CID)
    if record is None or not record["audio_stored"]:
        return None
    reader = blobs.open_audio(record["audio_path"])
    return b"".join(reader.chunks(0, reader.size, 1 << 16))


def lock_waiters(engine: Engine) -> int:
    """Backends of this database waiting for a lock (PostgreSQL): how the test sees the purge wait for the writer."""
    with engine.connect() as conn:
        query = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int(conn.execute(query).scalar_one())


class PausedWriter(threading.Thread):
    """Stores NEW for the conversation and stays inside its transaction, after the copy, until `go` is set."""

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        super().__init__(daemon=True)
        self.engine, self.blobs = engine, blobs
        self.paused, self.go = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        blob = put_audio(self.blobs, NEW)

        def work(conn: Connection) -> None:
            store.store_audio(conn, CID, blob, Source.AUDIO_WEBHOOK, datetime.now(UTC))
            self.paused.set()
            assert self.go.wait(BOUND_SECONDS)

        try:
            transaction(self.engine, work)
        except BaseException as exc:
            self.error = exc
        finally:
            blob.discard()


def test_a_purge_racing_a_write_keeps_the_audio_the_committed_record_claims(engine: Engine, blobs: S3Store) -> None:
    """The rewritten record carries no start time (only audio arrived), so it is young and the purge's next batch
    leaves it; `--audio-only` takes the same path to the bucket (`_remove_files`) but would rightly clear the
    record again, its start time being old."""
    records.store(engine, [records.detail(CID, start=1_700_000_000)])
    old = put_audio(blobs, OLD)
    transaction(engine, lambda conn: store.store_audio(conn, CID, old, Source.AUDIO_WEBHOOK, datetime.now(UTC)))
    assert stored_audio(engine, blobs) == OLD
    writer = PausedWriter(engine, blobs)
    serialised = is_sqlite(engine.url)  # SQLite's one write lock lets the writer in only before or after the purge

    def race(ids: object) -> None:
        """Between the purge's batch commit and its deletes: the writer copies NEW into place, and waits."""
        writer.start()
        if serialised:
            writer.go.set()
            writer.join(BOUND_SECONDS)
        else:
            assert writer.paused.wait(BOUND_SECONDS)

    purged: list[retention.PurgeReport] = []
    purger = threading.Thread(
        target=lambda: purged.append(
            retention.purge(engine, blobs, retention.Cutoff(int(time.time())), on_committed=race)
        ),
        daemon=True,
    )
    purger.start()
    if not serialised:
        assert writer.paused.wait(BOUND_SECONDS)
        deadline = time.monotonic() + BOUND_SECONDS
        # The writer commits once the purge has decided (it finished) or waits for it (a lock the writer holds).
        while purger.is_alive() and lock_waiters(engine) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        writer.go.set()
    purger.join(BOUND_SECONDS)
    writer.join(BOUND_SECONDS)
    assert writer.error is None and not writer.is_alive()
    assert len(purged) == 1
    assert stored_audio(engine, blobs) == NEW  # the committed record's audio is there, byte-identical


def test_a_copy_withdrawn_before_its_commit_is_gone(engine: Engine, blobs: S3Store) -> None:
    """What the write path does when an erase committed between its copy and its record's lock (record/store.py):
    the copy is taken back out of the bucket inside the transaction."""
    blob = put_audio(blobs, NEW)

    def erased_meanwhile(conn: Connection) -> None:
        blob.withdraw()  # nothing copied yet: nothing to take back
        relpath = blob.commit(CID)
        assert blobs.object_size(relpath) == len(NEW)
        blob.withdraw()

    transaction(engine, erased_meanwhile)
    blob.discard()
    assert blobs.object_size(audio_relpath(CID)) is None


def test_a_deleter_whose_transaction_failed_lets_go_of_the_key(postgres_url: str) -> None:
    """A session lock outlives its transaction: one whose transaction aborted must not stay with a pooled
    connection, or every later write of that key would wait for it in vain."""
    failing, other = create_engine(postgres_url), create_engine(postgres_url)
    ids = {"space": PATH_LOCK_CLASS, "path": path_lock_id("bucket", "rec/audio/conv_x.mp3")}

    def fails_while_deciding(conn: Connection) -> None:
        with path_locked("bucket", "rec/audio/conv_x.mp3"):
            conn.execute(sa.text("SELECT 1 / 0"))  # the check of the claim fails: the transaction is aborted

    try:
        with pytest.raises(StoreRefused):
            transaction(failing, fails_while_deciding)
        with other.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_try_advisory_lock(:space, :path)"), ids).scalar_one() is True
            conn.execute(sa.text("SELECT pg_advisory_unlock(:space, :path)"), ids)
    finally:
        failing.dispose()
        other.dispose()
