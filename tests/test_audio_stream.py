"""Splitting data.full_audio out of a streamed body: whatever the chunking, audio and skeleton come out whole."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.webhook.audio_splitter import AudioSplitter, Base64Decoder, StreamFormatError


def split(body: bytes, chunk_sizes: list[int]) -> tuple[bytes, bytes, bool]:
    out = bytearray()
    decoder = Base64Decoder(out.extend)
    splitter = AudioSplitter(decoder.feed)
    pos, i = 0, 0
    while pos < len(body):
        size = chunk_sizes[i % len(chunk_sizes)] if chunk_sizes else len(body)
        splitter.feed(body[pos : pos + size])
        pos += size
        i += 1
    skeleton = splitter.finish()
    decoder.finish()
    return skeleton, bytes(out), splitter.found_audio


def audio_event(audio: bytes, **extra: object) -> dict[str, object]:
    return {
        "type": "post_call_audio",
        "event_timestamp": 1,
        "data": {"agent_id": "a", "conversation_id": "c", "full_audio": base64.b64encode(audio).decode(), **extra},
    }


@given(
    audio=st.binary(max_size=300),
    chunks=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    escape_slashes=st.booleans(),
    indent=st.sampled_from([None, 2]),
)
@settings(max_examples=200)
def test_any_chunking_yields_the_audio_and_the_rest(
    audio: bytes, chunks: list[int], escape_slashes: bool, indent: int | None
) -> None:
    text = json.dumps(audio_event(audio), indent=indent)
    if escape_slashes:  # some encoders write '/' as '\/'
        text = text.replace("/", "\\/")
    skeleton, decoded, found = split(text.encode(), chunks)
    assert found
    assert decoded == audio
    expected = audio_event(b"")
    assert json.loads(skeleton) == expected


def test_full_audio_elsewhere_is_not_audio() -> None:
    body = json.dumps({"type": "x", "full_audio": "QUJD", "data": {"nested": {"full_audio": "QUJD"}}}).encode()
    skeleton, decoded, found = split(body, [7])
    assert not found
    assert decoded == b""
    assert skeleton == body


def test_a_key_named_like_the_path_inside_a_string_is_not_a_key() -> None:
    body = json.dumps({"data": {"note": '"full_audio": "QUJD"', "conversation_id": "c"}}).encode()
    skeleton, _decoded, found = split(body, [5])
    assert not found and skeleton == body


@pytest.mark.parametrize(
    "body",
    [b'{"data": {"full_audio": "QUJ"}}', b'{"data": {"full_audio": "@@@@"}}', b'{"data": {"full_audio": "QU', b"]"],
)
def test_broken_bodies_raise_the_format_error(body: bytes) -> None:
    with pytest.raises(StreamFormatError):
        split(body, [3])


def test_nesting_is_bounded() -> None:
    with pytest.raises(StreamFormatError):
        split(b"[" * 10_000, [4096])
