"""POST /webhooks/elevenlabs through the real app: status codes, replays, rotation, time window, durability."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.config import Settings
from service.web.app import create_app
from service.webhook.signature import sign
from tests.support import webhooks as wh
from tests.support.records import get_record

URL = "/webhooks/elevenlabs"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def post(client: TestClient, event: dict[str, object] | bytes, **kwargs: object) -> object:
    body = event if isinstance(event, bytes) else wh.encode(event)
    headers = wh.signed_headers(body, **kwargs)  # type: ignore[arg-type]
    return client.post(URL, content=body, headers=headers)


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())


def record(engine: Engine, conversation_id: str) -> dict[str, object]:
    with engine.connect() as conn:
        found = get_record(conn, conversation_id)
    assert found is not None, conversation_id
    return found


def test_transcription_is_stored_and_archived(client: TestClient, engine: Engine) -> None:
    answer = post(client, wh.transcription("conv_1"))
    assert answer.status_code == 200
    assert answer.json() == {"status": "accepted", "conversation_id": "conv_1"}
    stored = record(engine, "conv_1")
    assert stored["status"] == "done"
    assert stored["user_id"] == "user-42"
    assert stored["transcript_summary"] == "A short test call."
    assert stored["dynamic_variables"] == {"order_id": "o-1"}
    assert stored["first_seen_via"] == "webhook"
    assert stored["complete"] is True
    assert stored["webhook_received_at"] is not None
    assert count(engine, "webhook_event") == 1


def test_docs_example_payload_is_accepted_unchanged(client: TestClient, engine: Engine) -> None:
    body = (FIXTURES / "elevenlabs_docs_post_call_transcription.json").read_bytes()
    answer = post(client, body)
    assert answer.status_code == 200, answer.text
    conversation_id = json.loads(body)["data"]["conversation_id"]
    assert answer.json() == {"status": "accepted", "conversation_id": conversation_id}
    stored = record(engine, conversation_id)
    assert stored["status"] == "done"
    assert stored["start_time_unix_secs"] == json.loads(body)["data"]["metadata"]["start_time_unix_secs"]
    with engine.connect() as conn:
        archived = conn.exec_driver_sql("SELECT body FROM webhook_event").scalar_one()
    assert bytes(archived) == body


def test_replay_is_a_duplicate_and_changes_nothing(client: TestClient, engine: Engine) -> None:
    body = wh.encode(wh.transcription("conv_replay"))
    assert post(client, body).json()["status"] == "accepted"
    before = record(engine, "conv_replay")
    again = post(client, body)
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate", "conversation_id": "conv_replay"}
    # A retry signed with a new timestamp is the same body: still a duplicate.
    retried = post(client, body, timestamp=int(time.time()) + 5)
    assert retried.json()["status"] == "duplicate"
    assert record(engine, "conv_replay") == before
    assert count(engine, "webhook_event") == 1


def test_any_configured_secret_may_sign(settings: Settings, engine: Engine) -> None:
    rotated = settings.model_copy(
        update={
            "webhook_secrets": Settings(
                webhook_secrets="new-secret, " + wh.SECRET,
                _env_file=None,  # type: ignore[call-arg]
            ).webhook_secrets
        }
    )
    with TestClient(create_app(rotated, engine=engine)) as client:
        assert post(client, wh.transcription("conv_old"), secret=wh.SECRET).status_code == 200
        assert post(client, wh.transcription("conv_new"), secret="new-secret").status_code == 200
        assert post(client, wh.transcription("conv_bad"), secret="other").status_code == 401


def test_several_v0_entries_any_may_match(client: TestClient) -> None:
    body = wh.encode(wh.transcription("conv_multi"))
    ts = int(time.time())
    good = sign(body, wh.SECRET.encode(), ts).split(",")[1]
    header = f"t={ts}, v0={'0' * 64}, {good.upper().replace('V0=', 'v0=')}, v1=whatever"
    answer = client.post(URL, content=body, headers={"ElevenLabs-Signature": header})
    assert answer.status_code == 200


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (None, "missing"),
        ("", "empty"),
        ("t=abc,v0=" + "0" * 64, "non-digit timestamp"),
        ("v0=" + "0" * 64, "no timestamp"),
        ("t=1700000000", "no v0"),
        ("t=1700000000,v0=xyz", "short v0"),
        ("T=1700000000,V0=" + "0" * 64, "upper-case names"),
    ],
)
def test_malformed_or_missing_signature_is_401_and_stores_nothing(
    client: TestClient, engine: Engine, header: str | None, why: str
) -> None:
    headers = {} if header is None else {"ElevenLabs-Signature": header}
    answer = client.post(URL, content=wh.encode(wh.transcription("conv_x")), headers=headers)
    assert answer.status_code == 401, why
    assert "error" in answer.json()
    assert count(engine, "conversation") == 0
    assert count(engine, "webhook_event") == 0


def test_tampered_byte_is_401(client: TestClient, engine: Engine) -> None:
    body = wh.encode(wh.transcription("conv_tamper"))
    headers = wh.signed_headers(body)
    tampered = body.replace(b"conv_tamper", b"conv_tampex")
    assert client.post(URL, content=tampered, headers=headers).status_code == 401
    assert count(engine, "webhook_event") == 0


@pytest.mark.parametrize(("offset", "expected"), [(-31 * 60, 401), (-29 * 60, 200), (10 * 60, 401), (4 * 60, 200)])
def test_signature_time_window(client: TestClient, engine: Engine, offset: int, expected: int) -> None:
    answer = post(client, wh.transcription("conv_time"), timestamp=int(time.time()) + offset)
    assert answer.status_code == expected
    assert count(engine, "conversation") == (1 if expected == 200 else 0)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"type": "post_call_transcription", "data": {"agent_id": "a"}}', "no conversation_id"),
        (b'{"type": "post_call_transcription"}', "no data"),
        (b'{"type": "post_call_audio", "data": {"conversation_id": "c"}}', "audio without full_audio"),
        (b'{"type": "post_call_audio", "data": {"conversation_id": "c", "full_audio": "@@@"}}', "bad base64"),
        (b'{"type": "post_call_transcription", "data": {"conversation_id": "a\\u0000b"}}', "NUL in id"),
        (b"[" * 100_000 + b"]" * 100_000, "deeply nested"),
    ],
)
def test_signed_but_unreadable_body_is_400(client: TestClient, engine: Engine, body: bytes, why: str) -> None:
    answer = post(client, body)
    assert answer.status_code == 400, why
    assert count(engine, "conversation") == 0
    assert count(engine, "webhook_event") == 0


def test_unknown_type_is_archived_and_ignored(client: TestClient, engine: Engine) -> None:
    answer = post(client, {"type": "something_new", "event_timestamp": 1, "data": {"x": 1}})
    assert answer.status_code == 200
    assert answer.json() == {"status": "ignored", "conversation_id": None}
    assert count(engine, "webhook_event") == 1
    assert count(engine, "conversation") == 0


def test_failure_event_marks_the_conversation_failed(client: TestClient, engine: Engine) -> None:
    assert post(client, wh.failure("conv_fail")).json()["status"] == "accepted"
    stored = record(engine, "conv_fail")
    assert stored["status"] == "failed"
    assert stored["failure_reason"] == "busy"
    assert stored["metadata"] == {"type": "sip", "body": {"sip_status_code": 486, "error_reason": "Busy here"}}


def test_body_over_the_limit_is_413(settings: Settings, engine: Engine) -> None:
    small = settings.model_copy(update={"max_body_bytes": 1000})
    with TestClient(create_app(small, engine=engine)) as client:
        answer = post(client, wh.transcription("conv_big", transcript_summary="x" * 2000))
    assert answer.status_code == 413
    assert count(engine, "webhook_event") == 0


@pytest.mark.parametrize("order", ["audio_first", "transcription_first"])
def test_audio_and_transcription_in_either_order(
    client: TestClient, engine: Engine, settings: Settings, order: str
) -> None:
    mp3 = b"ID3\x04" + bytes(range(256)) * 40
    events = [wh.audio("conv_av", mp3), wh.transcription("conv_av")]
    if order == "transcription_first":
        events.reverse()
    for event in events:
        assert post(client, event).json()["status"] == "accepted"
    stored = record(engine, "conv_av")
    assert stored["audio_stored"] is True
    assert stored["status"] == "done"
    assert stored["audio_received_at"] is not None
    assert (settings.data_dir / str(stored["audio_path"])).read_bytes() == mp3
    assert count(engine, "webhook_event") == 2
    with engine.connect() as conn:
        bodies = conn.exec_driver_sql("SELECT event_type, body FROM webhook_event ORDER BY event_type").all()
    assert [(kind, body is None) for kind, body in bodies] == [
        ("post_call_audio", True),
        ("post_call_transcription", False),
    ]


def test_audio_base64_with_line_breaks_is_decoded_like_the_streamed_path(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    mp3 = b"ID3\x04" + bytes(range(256)) * 4
    event = wh.audio("conv_wrapped", mp3)
    text = event["data"]["full_audio"]
    event["data"]["full_audio"] = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # MIME-style
    assert post(client, event).json()["status"] == "accepted"
    assert (settings.data_dir / str(record(engine, "conv_wrapped")["audio_path"])).read_bytes() == mp3


def test_unsafe_conversation_id_cannot_escape_the_data_dir(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    assert post(client, wh.audio("../../etc/passwd", b"abc")).status_code == 400  # an id holding `/` is not an id
    assert post(client, wh.audio("..", b"abc")).status_code == 200
    stored = record(engine, "..")
    path = (settings.data_dir / str(stored["audio_path"])).resolve()
    assert path.is_relative_to(settings.data_dir.resolve())
    assert path.read_bytes() == b"abc"


def test_database_unavailable_is_503_without_crashing(settings: Settings, tmp_path: Path) -> None:
    broken = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}/missing-dir/none/x.db"})
    (tmp_path / "missing-dir").write_text("a file where a directory should be")
    from service.storage.db import create_engine

    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    with TestClient(create_app(broken, engine=engine)) as client:
        answer = post(client, wh.transcription("conv_down"))
        assert answer.status_code == 503
        assert answer.json()["error"]
        # The process keeps serving.
        assert post(client, wh.transcription("conv_down2")).status_code == 503
    engine.dispose()


def _large_audio_event(conversation_id: str, full_audio: str) -> bytes:
    """An audio event past the 1 MiB after which the receiver streams it, its bulk in padding around the audio."""
    padding = " " * (2 << 20)
    return (
        f'{{"type": "post_call_audio", "data": {{"conversation_id": "{conversation_id}",{padding}'
        f'"full_audio": "{full_audio}"}}}}'
    ).encode()


@pytest.mark.parametrize(
    "body",
    [
        wh.encode(wh.audio("conv_empty", b"")),
        b'{"type": "post_call_audio", "data": {"conversation_id": "conv_empty", "full_audio": "\\n"}}',
        _large_audio_event("conv_empty", ""),
        _large_audio_event("conv_empty", "\\n\\r\\n"),
    ],
    ids=["small", "small-only-a-line-break", "streamed", "streamed-only-line-breaks"],
)
def test_an_empty_audio_is_400_and_stores_nothing_whichever_path_reads_it(
    client: TestClient, engine: Engine, settings: Settings, body: bytes
) -> None:
    answer = client.post(URL, content=iter([body[:65536], body[65536:]]), headers=wh.signed_headers(body))

    assert answer.status_code == 400, answer.text
    assert answer.json() == {"error": "post_call_audio has no data.full_audio"}
    assert count(engine, "conversation") == 0
    assert count(engine, "webhook_event") == 0
    assert [path for path in settings.data_dir.rglob("*") if path.is_file()] == []
