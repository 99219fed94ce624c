"""`postcall reconcile --audio` into a bucket: every recording the fake platform serves lands byte-identical."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.engine import Engine

from service.config import Settings
from service.storage.s3 import PART_BYTES, make_client
from service.testing import FakePlatform, seed_conversations
from tests.support.reconcile import reconcile, rows
from tests.support.s3 import new_bucket_name

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("tiny_retry_waits")]
KEY = "reconcile-key"


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket, named to the command the way an operator does: POSTCALL_AUDIO_STORE and the endpoint."""
    name = new_bucket_name()
    make_client(s3_endpoint).create_bucket(Bucket=name)
    monkeypatch.setenv("POSTCALL_AUDIO_STORE", f"s3://{name}/rec")
    monkeypatch.setenv("POSTCALL_S3_ENDPOINT_URL", s3_endpoint)
    return name


def objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = make_client(endpoint)
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed}


def test_reconcile_audio_stores_every_recording_byte_identical_in_the_bucket(
    settings: Settings, engine: Engine, bucket: str, s3_endpoint: str
) -> None:
    conversations = seed_conversations(8, now=int(time.time()), failed_share=0.2, audio_share=0.75, seed=3)
    # Larger than a part: each recording goes up as a multipart upload, as a real one of minutes does.
    platform = FakePlatform(api_key=KEY, conversations=conversations, audio_bytes=PART_BYTES + 4321)
    with platform.serve() as fake_url:
        run = reconcile(settings, fake_url, KEY, "--audio", "--json")
        assert run.exit_code == 0, run.stderr
        with_audio = {c.conversation_id for c in platform.all() if c.status == "done" and c.has_audio}
        assert with_audio and run.json["audio_fetched"] == len(with_audio)
        records = {row["conversation_id"]: row for row in rows(engine, "conversation")}
        expected = {
            f"rec/{records[cid]['audio_path']}": platform.get(cid).audio(platform.audio_bytes) for cid in with_audio
        }
        assert all(records[cid]["audio_stored"] for cid in with_audio)
        # Exactly the recordings, byte-identical: nothing staged, no claim, nothing in the data dir's place.
        assert objects(s3_endpoint, bucket) == expected
        assert make_client(s3_endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert not (settings.data_dir / "audio").exists()
        platform.reset_calls()
        assert reconcile(settings, fake_url, KEY, "--audio").exit_code == 0
        assert platform.calls_to("audio") == []  # stored once: a second run fetches none again
