"""Reading the conversation_id out of a LiveKit conversation token, as ElevenLabs' client SDK does."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.broker.token import (
    conversation_id_from_room,
    conversation_id_from_signed_url,
    conversation_id_from_token,
    token_claims,
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(claims: Any, header: Any = None) -> str:
    """A JWT shaped like LiveKit's (HS256 header, claims, an opaque signature) — the signature is never checked."""
    head = header if header is not None else {"alg": "HS256", "typ": "JWT"}
    return ".".join([b64url(json.dumps(head).encode()), b64url(json.dumps(claims).encode()), b64url(b"sig" * 11)])


def livekit_claims(room: Any) -> dict[str, Any]:
    return {
        "exp": 1_760_000_900,
        "nbf": 1_760_000_000,
        "iss": "APIkey",
        "sub": "participant-7",
        "name": "Ada",
        "video": {"room": room, "roomJoin": True, "canPublish": True, "canSubscribe": True},
    }


def test_room_with_a_conv_part_gives_that_part() -> None:
    token = make_token(livekit_claims("room_conv_01jx7abcDEF123_agent_x"))
    assert conversation_id_from_token(token) == "conv_01jx7abcDEF123"


def test_first_conv_part_wins() -> None:
    assert conversation_id_from_room("conv_first-conv_second") == "conv_first"


def test_room_without_a_conv_part_is_the_whole_room_name() -> None:
    token = make_token(livekit_claims("room-42-xyz"))
    assert conversation_id_from_token(token) == "room-42-xyz"


def test_conv_prefix_without_id_characters_is_not_a_match() -> None:
    # `conv_` followed by nothing alphanumeric does not match the SDK's pattern: the whole name is used.
    assert conversation_id_from_room("conv_-x") == "conv_-x"


def test_padding_and_surrounding_white_space_are_tolerated() -> None:
    header, payload, signature = make_token(livekit_claims("conv_abc")).split(".")
    padded = f"  {header}.{payload}{'=' * (-len(payload) % 4)}.{signature}\n"
    assert conversation_id_from_token(padded) == "conv_abc"


def test_claims_are_read_without_a_signature_check() -> None:
    claims = livekit_claims("conv_abc")
    assert token_claims(make_token(claims)) == claims


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not a token",
        "a.b",
        "a.b.c.d",
        "header.!!!.sig",  # not base64url
        "header.abcde.sig",  # 5 base64 characters cannot be whole bytes
        f"h.{b64url(b'not json')}.s",
        f"h.{b64url(b'[1, 2]')}.s",  # JSON, but not an object
        "h." + b64url(b"\xff\xfe") + ".s",  # not UTF-8
        f"h.{b64url(b'[' * 5000 + b']' * 5000)}.s",  # nested past any parser's depth
        make_token({"sub": "x"}),  # no video grant
        make_token({"video": "room"}),  # grant not an object
        make_token({"video": {"roomJoin": True}}),  # no room
        make_token(livekit_claims(42)),  # room not a string
        make_token(livekit_claims("")),  # empty room name
        make_token(livekit_claims("room\x00name")),  # unprintable: not a usable id
        make_token(livekit_claims("r" * 300)),  # longer than any stored id may be
        "x." + "A" * 20_000 + ".y",  # absurdly long
    ],
)
def test_unrecognized_tokens_give_none(token: str) -> None:
    assert conversation_id_from_token(token) is None


@pytest.mark.parametrize("value", [None, 42, b"a.b.c", ["a", "b", "c"]])
def test_non_strings_give_none(value: object) -> None:
    assert conversation_id_from_token(value) is None


@given(st.text())
def test_any_string_gives_a_string_or_none(text: str) -> None:
    result = conversation_id_from_token(text)
    assert result is None or isinstance(result, str)


@given(st.lists(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=."), max_size=4))
def test_any_dotted_base64url_like_string_never_raises(parts: list[str]) -> None:
    result = conversation_id_from_token(".".join(parts))
    assert result is None or isinstance(result, str)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.dictionaries(st.text(), inner) | st.lists(inner),
    )
)
def test_any_json_payload_never_raises(claims: Any) -> None:
    result = conversation_id_from_token(make_token(claims))
    assert result is None or isinstance(result, str)


@given(st.text())
def test_any_room_name_gives_the_sdk_answer(room: str) -> None:
    result = conversation_id_from_token(make_token(livekit_claims(room)))
    expected = conversation_id_from_room(room)
    assert result == expected
    if result is not None:
        assert result in room
        assert result.startswith("conv_") or result == room


SIGNED = "wss://api.elevenlabs.io/v1/convai/conversation?agent_id=agent_1&conversation_signature=sig"


def test_signed_url_answer_prefers_the_top_level_id() -> None:
    answer = {"signed_url": f"{SIGNED}&conversation_id=conv_in_url", "conversation_id": "conv_top"}
    assert conversation_id_from_signed_url(answer) == "conv_top"


def test_signed_url_answer_falls_back_to_the_query_parameter() -> None:
    assert conversation_id_from_signed_url({"signed_url": f"{SIGNED}&conversation_id=conv_in_url"}) == "conv_in_url"


@pytest.mark.parametrize(
    "answer",
    [
        {"signed_url": SIGNED},
        {"signed_url": SIGNED, "conversation_id": None},
        {"signed_url": SIGNED, "conversation_id": 42},
        {"signed_url": f"{SIGNED}&conversation_id="},
        {"signed_url": "wss://[::1/x?conversation_id=conv_a"},  # not a parseable URL
        {"signed_url": 7},
        {},
    ],
)
def test_signed_url_answer_without_an_id_gives_none(answer: dict[str, Any]) -> None:
    assert conversation_id_from_signed_url(answer) is None


@given(st.dictionaries(st.sampled_from(["signed_url", "conversation_id", "x"]), st.text() | st.integers() | st.none()))
def test_any_signed_url_answer_never_raises(answer: dict[str, Any]) -> None:
    result = conversation_id_from_signed_url(answer)
    assert result is None or isinstance(result, str)
