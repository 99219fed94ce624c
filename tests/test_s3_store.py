"""Audio in an S3-compatible bucket: moto's real HTTP server on loopback, the real app over HTTP, no mocked client."""

from __future__ import annotations

import base64
import logging
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.config import Settings
from service.record import purge as retention
from service.record import store
from service.record.payloads import Source
from service.storage.copy import copy_audio
from service.storage.db import transaction
from service.storage.s3 import PART_BYTES, S3Store, make_client
from service.storage.stores import open_audio_store
from service.web.app import create_app
from tests.support import webhooks
from tests.support.audio_body import AudioBody, blocks_for
from tests.support.live import live_server
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, new_bucket_name
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.s3
AUTH = {"Authorization": "Bearer test-token"}


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = new_bucket_name()
    make_client(s3_endpoint).create_bucket(Bucket=name)
    return name


def s3_settings(settings: Settings, bucket: str, endpoint: str, grace: float | None = None) -> Settings:
    query = "" if grace is None else f"?grace={grace}"
    return settings.model_copy(update={"audio_store": f"s3://{bucket}/rec{query}", "s3_endpoint_url": endpoint})


@pytest.fixture
def bucket_settings(settings: Settings, bucket: str, s3_endpoint: str) -> Settings:
    return s3_settings(settings, bucket, s3_endpoint)


def keys(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = make_client(endpoint)
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed}


def unfinished_uploads(endpoint: str, bucket: str) -> list[Any]:
    return list(make_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def post_streamed(base: str, body: AudioBody) -> httpx.Response:
    timestamp = int(time.time())
    headers = {"ElevenLabs-Signature": body.signature(timestamp), "content-type": "application/json"}
    with httpx.Client(timeout=60) as client:
        return client.post(f"{base}/webhooks/elevenlabs", content=body.pieces(), headers=headers)


def post_event(base: str, event: dict[str, Any]) -> httpx.Response:
    raw = webhooks.encode(event)
    with httpx.Client(timeout=60) as client:
        return client.post(f"{base}/webhooks/elevenlabs", content=raw, headers=webhooks.signed_headers(raw))


def decoded(body: AudioBody) -> bytes:
    text = b"".join(body.pieces())
    start = text.index(b'"full_audio":"') + len(b'"full_audio":"')
    return base64.b64decode(text[start : text.index(b'"', start)])


def test_a_streamed_audio_webhook_lands_byte_identical_in_parts(
    bucket_settings: Settings, engine: Engine, bucket: str, s3_endpoint: str
) -> None:
    body = AudioBody("conv_streamed", blocks_for(20))  # 20 MiB: three parts of PART_BYTES at most
    assert body.audio_bytes > 2 * PART_BYTES
    with live_server(create_app(bucket_settings, engine=engine)) as base:
        answer = post_streamed(base, body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "accepted"
        stored = keys(s3_endpoint, bucket)
        assert list(stored) == ["rec/audio/conv_streamed.mp3"]  # no staged object, no claim left behind
        assert stored["rec/audio/conv_streamed.mp3"] == decoded(body)
        assert unfinished_uploads(s3_endpoint, bucket) == []
        served = httpx.get(f"{base}/v1/conversations/conv_streamed/audio", headers=AUTH, timeout=60)
        assert served.status_code == 200 and served.content == decoded(body)


def test_an_inline_audio_webhook_lands_byte_identical(
    bucket_settings: Settings, engine: Engine, bucket: str, s3_endpoint: str
) -> None:
    audio = b"ID3" + bytes(range(256)) * 40
    with live_server(create_app(bucket_settings, engine=engine)) as base:
        answer = post_event(base, webhooks.audio("conv_inline", audio))
        assert answer.status_code == 200, answer.text
    assert keys(s3_endpoint, bucket) == {"rec/audio/conv_inline.mp3": audio}


AUDIO = bytes(range(256)) * 1000  # 256,000 bytes: several streamed chunks


@pytest.mark.parametrize(
    ("header", "status", "content_range", "part"),
    [
        (None, 200, None, slice(None)),
        ("bytes=0-99", 206, "bytes 0-99/256000", slice(0, 100)),  # the first bytes
        ("bytes=65530-131100", 206, "bytes 65530-131100/256000", slice(65530, 131101)),  # a middle across chunks
        ("bytes=-500", 206, "bytes 255500-255999/256000", slice(255500, None)),  # a suffix
        ("bytes=256000-", 416, "bytes */256000", slice(0, 0)),  # unsatisfiable
    ],
)
def test_audio_ranges_stream_from_the_bucket(
    bucket_settings: Settings,
    engine: Engine,
    header: str | None,
    status: int,
    content_range: str | None,
    part: slice,
) -> None:
    with live_server(create_app(bucket_settings, engine=engine)) as base:
        assert post_event(base, webhooks.audio("conv_range", AUDIO)).status_code == 200
        headers = AUTH if header is None else {**AUTH, "Range": header}
        answer = httpx.get(f"{base}/v1/conversations/conv_range/audio", headers=headers, timeout=30)
    assert answer.status_code == status
    assert answer.headers.get("content-range") == content_range
    if status != 416:
        assert answer.content == AUDIO[part]
        assert answer.headers["content-length"] == str(len(AUDIO[part]))


def test_an_unreachable_store_503s_audio_in_time_and_the_same_delivery_is_accepted_later(
    settings: Settings, engine: Engine, bucket: str, s3_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    host, port = s3_endpoint.removeprefix("http://").split(":")
    audio_event = webhooks.audio("conv_outage", b"ID3" + b"\x01" * 5000)
    with TcpProxy((host, int(port))) as proxy:
        app = create_app(s3_settings(settings, bucket, f"http://127.0.0.1:{proxy.port}"), engine=engine)
        with live_server(app) as base:
            proxy.cut()
            started = time.monotonic()
            refused = post_event(base, audio_event)
            assert refused.status_code == 503, refused.text
            assert time.monotonic() - started < 30  # the bound PRODUCT.md promises
            assert post_event(base, webhooks.transcription("conv_outage")).status_code == 200
            assert httpx.get(f"{base}/readyz", timeout=30).status_code == 503
            assert keys(s3_endpoint, bucket) == {}  # nothing claimed, nothing staged
            proxy.restore()
            accepted = post_event(base, audio_event)  # the sender's retry: same body, same signature
            assert accepted.status_code == 200, accepted.text
            assert accepted.json()["status"] == "accepted"
            assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
    assert list(keys(s3_endpoint, bucket)) == ["rec/audio/conv_outage.mp3"]
    # botocore's own DEBUG lines name the access key id (never the secret); what serve logs (INFO up) names neither.
    assert SECRET_KEY not in caplog.text
    served_logs = "\n".join(record.getMessage() for record in caplog.records if record.levelno >= logging.INFO)
    assert ACCESS_KEY not in served_logs and SECRET_KEY not in served_logs


def test_a_copy_whose_transaction_never_commits_is_removed_at_start_up(
    settings: Settings, engine: Engine, bucket: str, s3_endpoint: str
) -> None:
    """The crash between the copy into audio/ and the commit, replayed: the transaction fails after the copy and
    the process 'dies' (nothing settles the claim); the next start-up removes the object no record claims."""
    blobs = open_audio_store(s3_settings(settings, bucket, s3_endpoint, grace=0))
    assert isinstance(blobs, S3Store)
    blob = blobs.open_temp()
    blob.write(b"ID3" + b"\x02" * (PART_BYTES + 10))  # one part sent while writing, one at sync
    blob.sync()

    def crash(conn: sa.Connection) -> None:
        store.store_audio(conn, "conv_crash", blob, Source.AUDIO_WEBHOOK, datetime.now(UTC))
        raise RuntimeError("the process dies before its commit")

    with pytest.raises(RuntimeError):
        transaction(engine, crash)
    assert "rec/audio/conv_crash.mp3" in keys(s3_endpoint, bucket)
    with live_server(create_app(s3_settings(settings, bucket, s3_endpoint, grace=0), engine=engine)):
        pass
    assert keys(s3_endpoint, bucket) == {}
    assert unfinished_uploads(s3_endpoint, bucket) == []


def test_start_up_aborts_an_upload_cut_off_mid_way(
    settings: Settings, engine: Engine, bucket: str, s3_endpoint: str
) -> None:
    blobs = open_audio_store(s3_settings(settings, bucket, s3_endpoint, grace=0))
    blob = blobs.open_temp()
    blob.write(b"\x03" * (PART_BYTES + 1))  # a part went up; the writer dies before sync
    assert len(unfinished_uploads(s3_endpoint, bucket)) == 1
    with live_server(create_app(s3_settings(settings, bucket, s3_endpoint, grace=0), engine=engine)):
        pass
    assert unfinished_uploads(s3_endpoint, bucket) == []
    assert keys(s3_endpoint, bucket) == {}


def test_start_up_leaves_young_uploads_of_other_replicas_alone(
    bucket_settings: Settings, engine: Engine, bucket: str, s3_endpoint: str
) -> None:
    blob = open_audio_store(bucket_settings).open_temp()
    blob.write(b"\x03" * (PART_BYTES + 1))
    with live_server(create_app(bucket_settings, engine=engine)):
        pass
    assert len(unfinished_uploads(s3_endpoint, bucket)) == 1  # within the grace: maybe alive elsewhere
    blob.discard()
    assert unfinished_uploads(s3_endpoint, bucket) == []


def test_purge_deletes_the_objects(bucket_settings: Settings, engine: Engine, bucket: str, s3_endpoint: str) -> None:
    with live_server(create_app(bucket_settings, engine=engine)) as base:
        assert post_event(base, webhooks.transcription("conv_old")).status_code == 200
        assert post_event(base, webhooks.audio("conv_old", b"ID3old")).status_code == 200
    assert list(keys(s3_endpoint, bucket)) == ["rec/audio/conv_old.mp3"]
    cutoff = retention.Cutoff(int(time.time()))  # the call started in 2025: older than now
    report = retention.purge(engine, open_audio_store(bucket_settings), cutoff, audio_only=True)
    assert report.audio_files == 1 and report.missing_files == 0
    assert keys(s3_endpoint, bucket) == {}
    with engine.connect() as conn:
        assert conn.execute(sa.select(retention.conversations.c.audio_stored)).scalar_one() is False


def test_audio_copy_is_complete_verified_and_resumable(
    settings: Settings, engine: Engine, bucket: str, s3_endpoint: str
) -> None:
    audios = {f"conv_copy{n}": bytes([n]) * (PART_BYTES + n * 1000) for n in range(1, 4)}
    with live_server(create_app(settings, engine=engine)) as base:  # the file store
        for conversation_id, audio in audios.items():
            assert post_event(base, webhooks.audio(conversation_id, audio)).status_code == 200
    source = open_audio_store(settings)
    target = open_audio_store(s3_settings(settings, bucket, s3_endpoint))
    assert isinstance(target, S3Store)

    def interrupt(relpath: str) -> None:
        raise KeyboardInterrupt  # the operator's Ctrl-C after the first object

    with pytest.raises(KeyboardInterrupt):
        copy_audio(source, target, interrupt)
    first = copy_audio(source, target)
    assert (first.copied, first.skipped) == (2, 1)  # resumed: the first object was verified, not written again
    again = copy_audio(source, target)
    assert (again.copied, again.skipped) == (0, 3)
    expected = {f"rec/audio/{cid}.mp3": audio for cid, audio in audios.items()}
    assert keys(s3_endpoint, bucket) == expected
    assert unfinished_uploads(s3_endpoint, bucket) == []
