"""Hostile input: whatever arrives at `POST /webhooks/elevenlabs` or in the read API's query string, postcall
answers it without a 500, stores nothing that is not correctly signed, writes no file outside its data dir, and
lets no query parameter change the meaning of a query.

The webhook is fuzzed with hypothesis through the real app (Starlette's TestClient), unsigned and correctly signed
(so the fuzz reaches past the signature check), on SQLite and PostgreSQL, then over real HTTP with uvicorn.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.api.query_params import JsonMatch
from service.config import Settings
from service.record import payloads
from service.web.app import create_app
from service.webhook.body import Pace
from service.webhook.signature import sign
from tests.support import records
from tests.support import webhooks as wh
from tests.support.live import live_server
from tests.support.process import serve_process

URL = "/webhooks/elevenlabs"
ESCAPE_MARK = "escaped-by-id"
# A deep data dir, so that an id climbing out of it with `../` still lands inside tmp_path, where the walk looks.
DATA_DIR_PARTS = ("deep", "er", "data")
SQLITE_FILES = ("postcall.db", "postcall.db-wal", "postcall.db-shm", "postcall.db-journal")


def fuzz_settings(max_examples: int) -> Any:
    return hypothesis_settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


def usable_id(value: Any) -> bool:
    """An id postcall can store under: 1 to 256 printable characters. U+FFFD, what a NUL is replaced by before
    anything is stored, is refused too: an id that held a NUL is not an id. So is one holding `/`, which no
    `/v1/conversations/{id}` could address."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= payloads.MAX_ID_LENGTH
        and value.isprintable()
        and "\ufffd" not in value
        and "/" not in value
    )


# --- strategies ------------------------------------------------------------------------------------------------------

# Any text, with the characters that have hurt before drawn often: NUL (PostgreSQL text and jsonb cannot hold one),
# U+FFFD (what postcall puts in a NUL's place), quotes, backslashes and SQL wildcards.
CHARACTERS = st.characters(exclude_categories=("Cs",)) | st.sampled_from(["\x00", "\ufffd", "'", '"', "\\", "%", "_"])
TEXT = st.text(CHARACTERS, max_size=32)
# Longer than the bounded columns (32, 64, 128, 256, 512, 1024 characters), one or more of them.
LONG_TEXT = st.builds(
    lambda seed, length: (seed * length)[:length],
    st.text(CHARACTERS, min_size=1, max_size=8),
    st.sampled_from([33, 65, 129, 257, 513, 1025, 4000]),
)
# Every integer orjson reads (up to 2**64 - 1, beyond a BIGINT column) and floats of any size, edges drawn often.
EDGES = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -(2**63), 1e30, -1e30, 2.0**63, 1e308, 0.5, -0.0])
INTEGERS = st.integers(-(2**63), 2**64 - 1) | EDGES
FLOATS = st.floats() | EDGES
PATHS = st.sampled_from(
    [
        f"../../../../{ESCAPE_MARK}",
        f"../../../../../../../../tmp/{ESCAPE_MARK}",
        f"/tmp/{ESCAPE_MARK}",
        f"..\\..\\..\\{ESCAPE_MARK}",
        f"a/../../../../../{ESCAPE_MARK}",
        f"%2e%2e%2f%2e%2e%2f{ESCAPE_MARK}",
        "..",
        ".",
        "/",
        "~",
        "con",
        "NUL",
        "audio",
        "tmp",
    ]
)
HOSTILE_IDS = st.one_of(
    PATHS,
    st.builds(lambda n, tail: "../" * n + tail, st.integers(1, 12), TEXT),
    st.sampled_from(["conv_\x00nul", "\x00", "x" * 10_000, "y" * 257, "z" * 256, "", " ", "\n", "conv_ok", "conv_é"]),
    st.text(max_size=300),
    INTEGERS,
    FLOATS,
    st.booleans(),
    st.none(),
    st.lists(TEXT, max_size=2),
    st.dictionaries(TEXT, TEXT, max_size=2),
)
# Anything where a string, number or object belongs: numbers where strings belong and the other way round, and
# strings longer than any column that holds them.
SCALARS = st.one_of(st.none(), st.booleans(), INTEGERS, FLOATS, TEXT, LONG_TEXT, PATHS)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
EVENT_TYPES = st.one_of(st.sampled_from(sorted(payloads.KNOWN_TYPES)), TEXT, SCALARS)
AUDIO = st.one_of(
    st.binary(min_size=1, max_size=300).map(lambda raw: base64.b64encode(raw).decode()),
    st.sampled_from(["", "not base64!", "====", "QUJD\n", "QU JD", "QUJ", "QQ=="]),
    SCALARS,
)


def _data(conversation_id: Any, fields: dict[str, Any], audio: Any, nest: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"conversation_id": conversation_id, **fields}
    if audio is not None:
        data["full_audio"] = audio
    if nest is not None:
        data["transcript"] = nest
    return data


def mostly(strategy: st.SearchStrategy[Any], otherwise: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`strategy` three times in four, else `otherwise` (`a | b` would flatten b's many branches beside a)."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda pick: strategy if pick else otherwise)


METADATA = st.fixed_dictionaries(
    {"start_time_unix_secs": mostly(EDGES, SCALARS)},
    optional={"call_duration_secs": SCALARS, "main_language": SCALARS, "extra": JSON_VALUES},
)
ANALYSIS = st.fixed_dictionaries({}, optional={"call_successful": SCALARS, "transcript_summary": SCALARS})
CLIENT_DATA = st.fixed_dictionaries({}, optional={"dynamic_variables": JSON_VALUES, "user_id": SCALARS})
FIELDS = st.fixed_dictionaries(
    {
        "metadata": mostly(METADATA, SCALARS),
        "analysis": mostly(ANALYSIS, JSON_VALUES),
        "conversation_initiation_client_data": mostly(CLIENT_DATA, SCALARS),
    },
    optional={
        "agent_id": SCALARS,
        "status": SCALARS,
        "user_id": SCALARS,
        "branch_id": SCALARS,
        "failure_reason": SCALARS,
    },
)
DATA = st.builds(_data, HOSTILE_IDS, FIELDS, st.none() | AUDIO, st.none() | JSON_VALUES) | JSON_VALUES
EVENTS = st.fixed_dictionaries({"type": EVENT_TYPES, "data": DATA}, optional={"event_timestamp": SCALARS})
# Events postcall can read — a usable id, hostile everything else — so that a good share of the fuzz gets stored.
USABLE_IDS = st.one_of(
    PATHS,
    st.builds(lambda n, tail: "../" * n + tail, st.integers(1, 12), TEXT),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=256).filter(usable_id),
)
READABLE_EVENTS = st.fixed_dictionaries(
    {
        "type": st.sampled_from([payloads.TRANSCRIPTION, payloads.TRANSCRIPTION, payloads.AUDIO, payloads.FAILURE]),
        "data": st.builds(_data, USABLE_IDS, FIELDS, AUDIO, st.none() | JSON_VALUES),
    }
)


def _deeply_nested(depth: int, wrapped: bool) -> bytes:
    inner = b"[" * depth + b"]" * depth
    return (
        b'{"type": "post_call_transcription", "data": {"conversation_id": "c", "x": ' + inner + b"}}"
        if wrapped
        else inner
    )


def _encoded(event: dict[str, Any], encoding: str) -> bytes:
    return orjson.dumps(event).decode().encode(encoding, "replace")


BODIES = st.one_of(
    READABLE_EVENTS.map(orjson.dumps),
    READABLE_EVENTS.map(orjson.dumps),
    EVENTS.map(orjson.dumps),
    st.builds(_encoded, EVENTS, st.sampled_from(["utf-16", "utf-32", "utf-8-sig", "latin-1", "cp1252", "ascii"])),
    st.builds(_deeply_nested, st.integers(1, 200_000), st.booleans()),
    EVENTS.map(orjson.dumps).flatmap(lambda body: st.integers(0, len(body)).map(lambda cut: body[:cut])),
    st.binary(max_size=4000),
    st.sampled_from([b"", b"null", b"[]", b"1", b'"x"', b"{}", b'{"type": null}', b"\x00" * 100, b"\xff\xfe{}"]),
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-16",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "",
        "*/*",
        "application/json" + ";x" * 2000,
    ]
)
HEADER_BYTES = st.binary(max_size=200).map(lambda raw: bytes(b for b in raw if b >= 0x20 or b == 0x09))
EXTRA_HEADERS = st.dictionaries(
    st.sampled_from(["content-encoding", "x-forwarded-for", "user-agent", "accept", "x-junk", "authorization"]),
    HEADER_BYTES | st.sampled_from([b"gzip", b"br", b"deflate, gzip", b"identity", b"A" * 100_000]),
    max_size=4,
)


def _stale_or_future(body: bytes, offset: int) -> str:
    return sign(body, wh.SECRET.encode(), int(time.time()) + offset)


@st.composite
def bad_signatures(draw: st.DrawFn, body: bytes) -> str | None:
    """Every way a delivery can fail to be correctly signed with the configured secret."""
    now = int(time.time())
    return draw(
        st.one_of(
            st.none(),
            st.text(max_size=300).map(lambda text: text.replace("\x00", "")),
            st.from_regex(r"\At=[0-9]{1,12},v0=[0-9a-fA-F]{64}\Z"),
            st.just(sign(body, b"not-the-secret", now)),
            st.just(sign(body + b" ", wh.SECRET.encode(), now)),  # the secret, another body
            st.sampled_from([-1801, -86400, 600, 10**6]).map(lambda offset: _stale_or_future(body, offset)),
            st.just(sign(body, wh.SECRET.encode(), now).upper()),  # element names are lower-case
            st.just(sign(body, wh.SECRET.encode(), now).replace("v0=", "v1=")),
            st.just(f"t={now},v0=" + "0" * 64 + ",t=" * 5000),  # a huge header
            st.just(wh.SECRET),
        )
    )


# Past the 1 MiB after which the receiver streams a body and splits data.full_audio off to disk as it arrives.
LARGE_AUDIO = base64.b64encode(bytes(range(256)) * 3300).decode()
DAMAGES = ("none", "bad character", "one character short", "escaped newline", "unicode escape", "escaped quote")
PLACES = ("data", "twice", "nested", "top level", "transcript")


def _damaged(text: str, damage: str, at: int) -> str:
    if damage == "bad character":
        return text[:at] + "!" + text[at + 1 :]
    if damage == "one character short":
        return text[:-1]
    if damage == "escaped newline":  # legal JSON that base64 ignores
        return text[:at] + "\\n" + text[at:]
    if damage == "unicode escape":  # legal JSON for the same character
        return text[:at] + "\\u0041" + text[at + 1 :]
    if damage == "escaped quote":
        return text[:at] + '\\"' + text[at:]
    return text


@st.composite
def large_bodies(draw: st.DrawFn) -> bytes:
    """An audio-shaped body over 1 MiB: its base64 damaged or not, in the right place or elsewhere, maybe cut."""
    # Weighted towards a well-formed audio event, so that the fuzz stores some as well as refusing some.
    damage = draw(st.one_of(st.just("none"), st.sampled_from(DAMAGES)))
    text = _damaged(LARGE_AUDIO, damage, draw(st.integers(0, len(LARGE_AUDIO) - 1)))
    member = b'"full_audio":"' + text.encode() + b'"'
    conversation_id = draw(st.one_of(USABLE_IDS, USABLE_IDS, HOSTILE_IDS))
    head = orjson.dumps({"conversation_id": conversation_id, "agent_id": "agent_1"})[:-1]
    place = draw(st.one_of(st.just("data"), st.sampled_from(PLACES)))
    data = {
        "data": head + b"," + member + b"}",
        "twice": head + b"," + member + b"," + member + b"}",
        "nested": head + b',"inner":{' + member + b"}}",
        "top level": head + b"}",
        "transcript": head + b',"transcript":[{"message":"' + text.encode() + b'"}]}',
    }[place]
    top = b"," + member if place == "top level" else b""
    event_type = draw(st.one_of(st.just(payloads.AUDIO), st.just(payloads.AUDIO), EVENT_TYPES))
    body = b'{"type":' + orjson.dumps(event_type) + top + b',"data":' + data + b"}"
    cut = draw(st.sampled_from([False, False, False, True]))
    return body[: draw(st.integers(len(body) // 2, len(body) - 1))] if cut else body


# --- the oracle: what the README promises for a correctly signed body --------------------------------------------


LINE_BREAKS = str.maketrans("", "", "\r\n\t")


def valid_base64(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        base64.b64decode(value, validate=True)
    except ValueError:
        return False
    return True


def promised_statuses(body: bytes) -> frozenset[int]:
    """200 for a readable event (or any event of another type), 400 for anything postcall cannot read."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return frozenset({400})  # not JSON
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
        return frozenset({400})
    data = payload.get("data")
    conversation_id = data.get("conversation_id") if isinstance(data, dict) else None
    if payload["type"] not in payloads.KNOWN_TYPES:
        # README: another type is archived and answered 200, "never an error". postcall refuses one whose
        # data.conversation_id is present but unusable (400); the contract does not settle that case.
        return frozenset({200}) if conversation_id is None or usable_id(conversation_id) else frozenset({200, 400})
    if not usable_id(conversation_id):
        return frozenset({400})  # lacks a (usable) data.conversation_id
    assert isinstance(data, dict)
    if payload["type"] == payloads.AUDIO and not valid_base64(data.get("full_audio")):
        audio = data.get("full_audio")
        if isinstance(audio, str) and valid_base64(audio.translate(LINE_BREAKS)):
            return frozenset({200, 400})  # base64 with line breaks: the streamed path skips them, the small refuses
        return frozenset({400})
    return frozenset({200})


# --- the store and the disk ------------------------------------------------------------------------------------------


def counts(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        conversations = conn.execute(sa.text("SELECT count(*) FROM conversation")).scalar_one()
        archived = conn.execute(sa.text("SELECT count(*) FROM webhook_event")).scalar_one()
    return int(conversations), int(archived)


def files_under(root: Path) -> set[Path]:
    return {Path(folder) / name for folder, _, names in os.walk(root) for name in names}


@dataclass
class Box:
    """The app under test, its data dir deep inside tmp_path, and the files that were there before."""

    client: TestClient
    settings: Settings
    engine: Engine
    root: Path
    data_dir: Path
    before: set[Path]
    audio_ids: list[str]

    def stray_files(self) -> list[Path]:
        """Files created outside the data dir, under tmp_path or where a naive `audio/<id>.mp3` would point."""
        allowed = {self.root / name for name in SQLITE_FILES}
        strays = [
            path
            for path in files_under(self.root) - self.before - allowed
            if not path.resolve().is_relative_to(self.data_dir.resolve())
        ]
        for conversation_id in self.audio_ids:
            naive = os.path.normpath(self.data_dir / "audio" / f"{conversation_id}.mp3")
            if not Path(naive).is_relative_to(self.data_dir) and os.path.lexists(naive):
                strays.append(Path(naive))
        return strays


@pytest.fixture
def box(settings: Settings, engine: Engine, tmp_path: Path) -> Iterator[Box]:
    data_dir = tmp_path.joinpath(*DATA_DIR_PARTS)
    boxed = settings.model_copy(update={"data_dir": data_dir})
    before = files_under(tmp_path)
    # raise_server_exceptions=False: a 500 is an answer to assert on, with the example that caused it.
    with TestClient(create_app(boxed, engine=engine), raise_server_exceptions=False) as client:
        yield Box(client, boxed, engine, tmp_path, data_dir, before, [])


def post(box: Box, body: bytes, signature: str | None, content_type: str, extra: dict[str, bytes]) -> httpx.Response:
    headers: dict[str, Any] = {**extra, "content-type": content_type}
    if signature is not None:
        headers["elevenlabs-signature"] = signature.encode()  # raw UTF-8 bytes, whatever the text holds
    return box.client.post(URL, content=body, headers=headers)


# --- the webhook fuzz ----------------------------------------------------------------------------------------------


def test_a_delivery_that_is_not_correctly_signed_is_401_and_leaves_nothing(box: Box) -> None:
    sent = []

    @fuzz_settings(max_examples=150)
    @given(body=BODIES, data=st.data(), content_type=CONTENT_TYPES, extra=EXTRA_HEADERS)
    def deliver(body: bytes, data: st.DataObject, content_type: str, extra: dict[str, bytes]) -> None:
        signature = data.draw(bad_signatures(body))
        answer = post(box, body, signature, content_type, extra)
        sent.append(answer.status_code)
        assert answer.status_code == 401, (answer.status_code, answer.text)
        assert answer.json() == {"error": "invalid signature"}

    deliver()
    assert len(sent) >= 100
    assert counts(box.engine) == (0, 0)  # no record, no archived event
    assert files_under(box.data_dir) == set()  # not even a temp file
    assert box.stray_files() == []


def test_correctly_signed_garbage_is_400_readable_events_are_200_and_nothing_is_a_500(box: Box) -> None:
    outcomes: dict[int, int] = {}

    @fuzz_settings(max_examples=500)
    @given(body=BODIES, content_type=CONTENT_TYPES, extra=EXTRA_HEADERS)
    def deliver(body: bytes, content_type: str, extra: dict[str, bytes]) -> None:
        stored_before = counts(box.engine)
        answer = post(box, body, wh.signed_headers(body)["ElevenLabs-Signature"], content_type, extra)
        outcomes[answer.status_code] = outcomes.get(answer.status_code, 0) + 1
        assert answer.status_code != 500, f"500 for {body[:300]!r}"
        assert answer.status_code in promised_statuses(body), (answer.status_code, answer.text, body[:300])
        if answer.status_code == 200:
            assert_recorded(box, body, answer.json())
        else:
            assert answer.json().keys() == {"error"}
            assert counts(box.engine) == stored_before  # a refused body stores nothing

    deliver()
    assert outcomes.get(200, 0) >= 20 and outcomes.get(400, 0) >= 20, outcomes  # the fuzz reached both sides
    assert box.stray_files() == []


def assert_recorded(box: Box, body: bytes, answer: dict[str, Any]) -> None:
    payload = orjson.loads(body)
    data = payload["data"] if isinstance(payload.get("data"), dict) else {}
    conversation_id = data.get("conversation_id")
    if payload["type"] not in payloads.KNOWN_TYPES:
        assert answer["status"] in ("ignored", "duplicate")
        return
    assert answer["status"] in ("accepted", "duplicate")
    assert answer["conversation_id"] == conversation_id
    with box.engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT audio_stored FROM conversation WHERE conversation_id = :cid"), {"cid": conversation_id}
        ).first()
    assert stored is not None
    if payload["type"] == payloads.AUDIO:
        assert stored.audio_stored
        box.audio_ids.append(conversation_id)


def _large_audio_event(audio: str, padding: bytes = b"", conversation_id: str = "conv_streamed") -> bytes:
    data = b'{"conversation_id":"' + conversation_id.encode() + b'","full_audio":"' + audio.encode() + b'"}'
    return b'{"type":"post_call_audio","data":' + data + padding + b"}"


_BAD_CHARACTER = LARGE_AUDIO[:1000] + "!" + LARGE_AUDIO[1001:]
_TWO_MIB = b" " * (2 << 20)


WELL_FORMED_LARGE = [
    _large_audio_event(LARGE_AUDIO, b"", "conv_streamed_1"),
    _large_audio_event(LARGE_AUDIO[:5000] + "\\n" + LARGE_AUDIO[5000:], b"", "conv_streamed_2"),
    _large_audio_event(LARGE_AUDIO, b" " * 100_000, "conv_streamed_3"),
]


def test_large_streamed_bodies_are_200_or_400_never_a_500_and_leave_no_temp_file(box: Box) -> None:
    for body in WELL_FORMED_LARGE:  # the streamed path does store: a refusal of everything would pass the fuzz
        answer = box.client.post(URL, content=iter([body[:65536], body[65536:]]), headers=wh.signed_headers(body))
        assert answer.json()["status"] == "accepted"
    outcomes: dict[int, int] = {}

    @fuzz_settings(max_examples=30)
    @given(body=large_bodies())
    def deliver(body: bytes) -> None:
        stored_before = counts(box.engine)
        answer = box.client.post(URL, content=iter([body[:65536], body[65536:]]), headers=wh.signed_headers(body))
        outcomes[answer.status_code] = outcomes.get(answer.status_code, 0) + 1
        assert answer.status_code in (200, 400), (answer.status_code, answer.text, body[:200])
        # Streaming decodes any data.full_audio as it arrives, so it may refuse a body a parser would accept (a
        # transcription carrying broken audio); it must never accept one the contract refuses.
        if promised_statuses(body) == {400}:
            assert answer.status_code == 400, (answer.text, body[:200])
        if answer.status_code == 200:
            assert_recorded(box, body, answer.json())
        else:
            assert counts(box.engine) == stored_before

    deliver()
    assert outcomes.get(400, 0) >= 5, outcomes
    assert files_under(box.data_dir / "tmp") == set()  # every temp file was committed or removed
    assert box.stray_files() == []


@dataclass(frozen=True)
class StreamCase:
    name: str
    body: bytes
    signed: bool
    answers: frozenset[int]


STREAM_CASES = [
    StreamCase("signed-non-base64-character", _large_audio_event(_BAD_CHARACTER), True, frozenset({400})),
    StreamCase("forged-non-base64-character", _large_audio_event(_BAD_CHARACTER), False, frozenset({401})),
    StreamCase(
        "signed-escaped-quote-in-audio",
        _large_audio_event(LARGE_AUDIO[:1000] + '\\"' + LARGE_AUDIO[1000:]),
        True,
        frozenset({400}),
    ),
    StreamCase(
        "signed-unicode-escape-in-audio",
        _large_audio_event(LARGE_AUDIO[:1000] + "\\u0041" + LARGE_AUDIO[1001:]),
        True,
        frozenset({200, 400}),  # legal JSON for the same text: stored or refused, either is fair
    ),
    StreamCase("forged-nested-300-deep", b'{"x":' + b"[" * 300 + b"]" * 300 + _TWO_MIB + b"}", False, frozenset({401})),
    StreamCase("signed-stray-bracket", b"]" + _TWO_MIB, True, frozenset({400})),
]


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda case: case.name)
def test_a_streamed_body_the_splitter_cannot_read_is_401_if_forged_else_400(box: Box, case: StreamCase) -> None:
    headers = wh.signed_headers(case.body, secret=wh.SECRET if case.signed else "not-the-secret")

    answer = box.client.post(URL, content=iter([case.body[:65536], case.body[65536:]]), headers=headers)

    assert answer.status_code in case.answers, answer.text
    assert files_under(box.data_dir / "tmp") == set()


def test_audio_for_ids_that_name_paths_is_stored_inside_the_data_dir(box: Box) -> None:
    refused = [f"../../../../{ESCAPE_MARK}", f"../../../../../../{ESCAPE_MARK}", f"/tmp/{ESCAPE_MARK}", "a/../b"]
    for conversation_id in refused:  # an id holding `/` is not an id (issue 18, item 15)
        body = wh.encode(wh.audio(conversation_id, b"ID3" + conversation_id.encode()))
        assert box.client.post(URL, content=body, headers=wh.signed_headers(body)).status_code == 400
    ids = ["..", ".", f"..\\..\\..\\{ESCAPE_MARK}", f"%2e%2e%2f{ESCAPE_MARK}", "~"]
    for conversation_id in ids:
        body = wh.encode(wh.audio(conversation_id, b"ID3" + conversation_id.encode()))
        answer = box.client.post(URL, content=body, headers=wh.signed_headers(body))
        assert answer.json() == {"status": "accepted", "conversation_id": conversation_id}
        box.audio_ids.append(conversation_id)
        path = box.client.get(
            f"/v1/conversations/{conversation_id}/audio", headers={"Authorization": "Bearer test-token"}
        )
        assert path.status_code in (200, 404)  # an id with '/' cannot be a path segment; never a file outside
    stored = files_under(box.data_dir / "audio")
    assert len(stored) == len(ids)
    assert all(path.parent == box.data_dir / "audio" / "_" for path in stored)  # named by the id's SHA-256
    assert box.stray_files() == []
    assert not list(Path("/tmp").glob(f"{ESCAPE_MARK}*"))


# --- values a column cannot hold -------------------------------------------------------------------------------------


def _transcription(**data: Any) -> dict[str, Any]:
    return wh.transcription("conv_odd", **data)


def _failure_with_reason(reason: str) -> dict[str, Any]:
    event = wh.failure("conv_odd")
    event["data"]["failure_reason"] = reason
    return event


# Each was a 500 once, on one database or both: a value passed on to a column that cannot hold it.
ODD_VALUES = {
    "start-time-beyond-bigint": _transcription(metadata={"start_time_unix_secs": 2**63}),
    "start-time-1e30": _transcription(metadata={"start_time_unix_secs": 1e30}),
    "agent-id-of-257-chars": _transcription(agent_id="a" * 257),
    "user-id-of-1025-chars": _transcription(user_id="u" * 1025),
    "call-successful-of-33-chars": _transcription(analysis={"call_successful": "s" * 33}),
    "main-language-of-65-chars": _transcription(metadata={"main_language": "l" * 65}),
    "nul-in-failure-reason": _failure_with_reason("busy\x00"),
    "nul-in-transcript": _transcription(transcript=[{"role": "user", "message": "a\x00b"}]),
    "nul-in-dynamic-variable-name": _transcription(
        conversation_initiation_client_data={"dynamic_variables": {"a\x00": 1}}
    ),
    "nul-in-unknown-type": {"type": "future\x00event", "data": {}},
}


@pytest.mark.parametrize("event", ODD_VALUES.values(), ids=list(ODD_VALUES))
def test_values_no_column_can_hold_are_accepted_and_read_back_never_a_500(box: Box, event: dict[str, Any]) -> None:
    body = orjson.dumps(event)

    answer = box.client.post(URL, content=body, headers=wh.signed_headers(body))

    assert answer.status_code == 200, answer.text
    if event["type"] in payloads.KNOWN_TYPES:
        read = box.client.get("/v1/conversations/conv_odd", headers={"Authorization": "Bearer test-token"})
        assert read.status_code == 200
        assert "\x00" not in read.text and "\\u0000" not in read.text


# --- over real HTTP ------------------------------------------------------------------------------------------------


def raw_exchange(base_url: str, request: bytes, *, hang_up: bool = False) -> bytes:
    """Send raw bytes on a fresh connection (then hang up, if asked) and read the answer's head, if any comes."""
    host, port = base_url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(request)
            if hang_up:
                sock.shutdown(socket.SHUT_WR)
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server closed on us: an answer too
    return answer


def http_request(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body


def _signed_head(body: bytes, extra: str = "") -> str:
    signature = wh.signed_headers(body)["ElevenLabs-Signature"]
    return f"POST {URL} HTTP/1.1\nHost: x\nElevenLabs-Signature: {signature}\n{extra}"


EVENT = wh.encode(wh.transcription("conv_raw"))
RAW_REQUESTS = {
    "header of 1 MB": http_request(f"POST {URL} HTTP/1.1\nHost: x\nElevenLabs-Signature: {'t' * 1_000_000}\n"),
    "10,000 headers": http_request(f"POST {URL} HTTP/1.1\nHost: x\n" + "X-A: b\n" * 10_000),
    "NUL in a header": http_request(f"POST {URL} HTTP/1.1\nHost: x\nElevenLabs-Signature: t=1\x00,v0=0\n"),
    "bytes beyond ASCII in the path": http_request(f"POST {URL}/\xff\xfe HTTP/1.1\nHost: x\n"),
    "not HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200),
    "content-length longer than the body": http_request(
        _signed_head(EVENT, f"Content-Length: {len(EVENT) + 100}\n"), EVENT
    ),
    "content-length shorter than the body": http_request(_signed_head(EVENT, "Content-Length: 10\n"), EVENT),
    "negative content-length": http_request(_signed_head(EVENT, "Content-Length: -5\n"), EVENT),
    "two content-lengths": http_request(_signed_head(EVENT, "Content-Length: 5\nContent-Length: 7\n"), EVENT),
    "bogus chunk size": http_request(_signed_head(EVENT, "Transfer-Encoding: chunked\n"), b"zz\r\n" + EVENT),
    "chunked and content-length": http_request(
        _signed_head(EVENT, f"Transfer-Encoding: chunked\nContent-Length: {len(EVENT)}\n"), EVENT
    ),
    "huge chunk size": http_request(_signed_head(EVENT, "Transfer-Encoding: chunked\n"), b"ffffffffffffffff\r\nab"),
    "HTTP/0.9": f"POST {URL}\r\n\r\n".encode(),
    "pipelined garbage": http_request(_signed_head(EVENT, f"Content-Length: {len(EVENT)}\n"), EVENT) + bytes(5000),
}


@pytest.fixture
def live(box: Box) -> Iterator[str]:
    """The same store behind uvicorn; a short grace, so that a body that never comes is answered 408 quickly."""
    app = create_app(box.settings, engine=box.engine, pace=Pace(grace_seconds=1.0, min_bytes_per_second=1000))
    with live_server(app) as url:
        yield url


def test_malformed_http_gets_an_error_answer_never_a_500_and_the_server_keeps_serving(box: Box, live: str) -> None:
    for name, raw in RAW_REQUESTS.items():
        status_line = raw_exchange(live, raw).split(b"\r\n", 1)[0]
        # A client error (400, 401, 408…); the well-formed request ahead of the pipelined garbage may be a 200.
        allowed = (b"HTTP/1.1 2", b"HTTP/1.1 4") if name == "pipelined garbage" else (b"HTTP/1.1 4",)
        assert status_line.startswith(allowed), (name, status_line)
    assert httpx.get(f"{live}/healthz", timeout=10).status_code == 200
    assert counts(box.engine)[0] <= 1  # at most that one well-formed request
    assert box.stray_files() == []


def webhook_statuses(base_url: str) -> set[str]:
    """The statuses /metrics has seen the webhook route answer with."""
    scraped = httpx.get(f"{base_url}/metrics", timeout=10).text
    route = f'route="{URL}"'
    return {
        line.split('status="')[1].split('"')[0]
        for line in scraped.splitlines()
        if line.startswith("postcall_http_request_duration_seconds_count") and route in line
    }


def test_a_sender_that_hangs_up_mid_body_stores_nothing_and_is_not_a_server_error(box: Box, live: str) -> None:
    assert raw_exchange(live, RAW_REQUESTS["content-length longer than the body"], hang_up=True) == b""
    deadline = time.monotonic() + 10
    while not webhook_statuses(live) and time.monotonic() < deadline:
        time.sleep(0.05)  # the server notices the hang-up on its own time

    assert counts(box.engine) == (0, 0)
    assert "500" not in webhook_statuses(live)


def test_over_real_http_signed_hostile_events_are_never_a_500(box: Box, live: str) -> None:
    statuses: list[int] = []
    with httpx.Client(base_url=live, timeout=30) as client:

        @fuzz_settings(max_examples=40)
        @given(body=BODIES, chunked=st.booleans())
        def deliver(body: bytes, chunked: bool) -> None:
            headers = wh.signed_headers(body)
            content: Any = iter([body[: len(body) // 2], body[len(body) // 2 :]]) if chunked else body
            answer = client.post(URL, content=content, headers=headers)
            statuses.append(answer.status_code)
            assert answer.status_code != 500, body[:300]
            assert answer.status_code in promised_statuses(body), (answer.status_code, answer.text, body[:300])

        deliver()
    assert len(statuses) >= 30
    assert box.stray_files() == []


# --- the read API's query string -------------------------------------------------------------------------------------

AUTH = {"Authorization": "Bearer test-token"}
INJECTIONS = [
    "' OR 1=1 --",
    "' OR '1'='1",
    '" OR ""="',
    "x'; DROP TABLE conversation; --",
    "1) OR (1=1",
    "%",
    "_",
    "\\",
    "*",
    "$.x",
    '{"x": "a"}',
    "a' UNION SELECT conversation_id FROM conversation --",
]
STORED_VARIABLES: dict[str, Any] = {
    "conv_a": "a",
    "conv_inject": "' OR 1=1 --",
    "conv_percent": "%",
    "conv_underscore": "_",
    "conv_three": 3,
    "conv_true": True,
    "conv_quote": '" OR ""="',
}


@pytest.fixture
def seeded(box: Box) -> Box:
    observations = [
        records.detail(cid, start=1_760_000_000 + i, dynamic_variables={"x": value}, user_id=f"user-{i}")
        for i, (cid, value) in enumerate(STORED_VARIABLES.items())
    ]
    observations.append(records.detail("conv_other", dynamic_variables={"y": "a"}))
    observations.append(records.session("conv_labelled", labels={"team": "' OR 1=1 --"}))
    records.store(box.engine, observations)
    return box


def listed(box: Box, params: list[tuple[str, str]]) -> httpx.Response:
    return box.client.get("/v1/conversations", params=params, headers=AUTH)


def ids_of(answer: httpx.Response) -> set[str]:
    return {record["conversation_id"] for record in answer.json()["conversations"]}


def matching(value: str) -> set[str]:
    """The documented rule: equal as a string, or as the number or boolean the value reads as."""
    match = JsonMatch("x", value)
    found = set()
    for cid, stored in STORED_VARIABLES.items():
        if isinstance(stored, str) and stored == value:
            found.add(cid)
        elif isinstance(stored, bool):
            if match.boolean is not None and stored is match.boolean:
                found.add(cid)
        elif match.number is not None and stored == match.number:
            found.add(cid)
    return found


@pytest.mark.parametrize("value", INJECTIONS)
def test_an_injection_in_a_filter_value_matches_only_what_equals_it(seeded: Box, value: str) -> None:
    total = counts(seeded.engine)[0]
    for name in ("agent_id", "status", "user_id", "call_successful"):
        answer = listed(seeded, [(name, value)])
        assert answer.status_code == 200, answer.text
        assert ids_of(answer) == set(), name
    by_variable = listed(seeded, [("var.x", value)])
    assert by_variable.status_code == 200
    assert ids_of(by_variable) == matching(value)
    by_label = listed(seeded, [("label.team", value)])
    assert ids_of(by_label) == ({"conv_labelled"} if value == "' OR 1=1 --" else set())
    assert counts(seeded.engine)[0] == total  # and nothing was dropped or changed


@pytest.mark.parametrize(
    "params",
    [
        [("var.x') OR 1=1 --", "a")],
        [('var.x"]', "a")],
        [("var.", "a")],
        [("var.$", "a")],
        [("label.a' OR '1'='1", "b")],
        [("limit", "1; DROP TABLE conversation")],
        [("limit", "1 OR 1=1")],
        [("started_after", "0 OR 1=1")],
        [("has_audio", "true OR 1=1")],
        [("source", "webhook' OR '1'='1")],
        [("cursor", base64.urlsafe_b64encode(b'["1 OR 1=1", "x"]').decode())],
        [("cursor", "' OR 1=1 --")],
        [("agent_id", "a\x00b")],
        [("agent_id", "a" * 1025)],
        [("x' OR 1=1 --", "1")],
    ],
)
def test_an_injection_in_a_parameter_name_or_typed_value_is_422(seeded: Box, params: list[tuple[str, str]]) -> None:
    answer = listed(seeded, params)
    assert answer.status_code == 422, answer.text
    assert answer.json()["parameter"] == params[0][0]


def test_a_cursor_carrying_an_injection_is_only_a_sort_key(seeded: Box) -> None:
    cursor = base64.urlsafe_b64encode(orjson.dumps([1_760_000_100, "' OR 1=1 --"])).decode().rstrip("=")
    answer = listed(seeded, [("cursor", cursor)])
    assert answer.status_code == 200
    # Newer than every stored start: the page after it is everything, in order; nothing more, nothing less.
    assert ids_of(answer) == {*STORED_VARIABLES, "conv_other", "conv_labelled"}


def test_any_variable_value_matches_exactly_the_records_equal_to_it(seeded: Box) -> None:
    seen = {"ok": 0, "refused": 0}

    @fuzz_settings(max_examples=150)
    @given(value=st.text(max_size=40) | st.sampled_from(INJECTIONS) | st.sampled_from(["3", "3.0", "true", "-0"]))
    def query(value: str) -> None:
        answer = listed(seeded, [("var.x", value)])
        if value == "" or "\x00" in value:
            assert answer.status_code == 422
            seen["refused"] += 1
            return
        assert answer.status_code == 200, answer.text
        assert ids_of(answer) == matching(value), value
        seen["ok"] += 1

    query()
    assert seen["ok"] >= 100


# --- slow senders against a real `postcall serve` --------------------------------------------------------------------

TRICKLERS = 200


def trickling_connections(base_url: str, count: int) -> list[socket.socket]:
    """Connections that have sent the start of a request head and keep adding one header line at a time."""
    host, port = base_url.removeprefix("http://").split(":")
    connections = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\n".encode())
        connections.append(sock)
    return connections


def test_a_real_serve_answers_webhooks_while_200_senders_trickle_their_request_heads(tmp_path: Path) -> None:
    # tests/test_slow_sender.py covers a trickled *body* (408); this is the head, against the real command.
    env = {
        "POSTCALL_DATABASE_URL": f"sqlite:///{tmp_path}/serve.db",
        "POSTCALL_DATA_DIR": str(tmp_path / "data"),
        "POSTCALL_WEBHOOK_SECRETS": wh.SECRET,
    }
    body = wh.encode(wh.transcription("conv_amid_tricklers"))
    with serve_process(env) as (base_url, _):
        tricklers = trickling_connections(base_url, TRICKLERS)
        try:
            for _ in range(3):
                for sock in tricklers:
                    # serve closes a head still incomplete after 10 s (tests/test_serve_limits.py): on a slow
                    # machine some tricklers may already be gone, which is that limit working.
                    with contextlib.suppress(OSError):
                        sock.sendall(b"X-Slow: 1\r\n")
                started = time.monotonic()
                answer = httpx.post(f"{base_url}{URL}", content=body, headers=wh.signed_headers(body), timeout=30)
                elapsed = time.monotonic() - started
                assert answer.status_code == 200, answer.text
                assert elapsed < 5, f"a webhook took {elapsed:.1f} s while {TRICKLERS} senders trickled"
            assert httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200
        finally:
            for sock in tricklers:
                sock.close()
