"""The ElevenLabs-Signature header: strict parsing, the time window, rotation, and nothing but SignatureError."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.webhook.signature import BodyVerifier, SignatureError, check_timestamp, parse_header, sign

NOW = 1_760_000_000
BODY = b'{"type": "post_call_transcription"}'


def verify(header_value: str | None, body: bytes, secrets: Sequence[bytes], now: float, tolerance: int) -> None:
    """What the receiver does, with the whole body in one chunk: parse, check the window, verify."""
    header = parse_header(header_value)
    check_timestamp(header, now, tolerance)
    verifier = BodyVerifier(header, secrets)
    verifier.update(body)
    verifier.verify()


def test_signed_body_verifies() -> None:
    verify(sign(BODY, b"s1", NOW), BODY, [b"s1"], now=NOW, tolerance=1800)


def test_any_secret_of_several_matches() -> None:
    verify(sign(BODY, b"old", NOW), BODY, [b"new", b"old"], now=NOW, tolerance=1800)


def test_wrong_secret_is_a_mismatch() -> None:
    with pytest.raises(SignatureError) as raised:
        verify(sign(BODY, b"other", NOW), BODY, [b"s1"], now=NOW, tolerance=1800)
    assert raised.value.reason == "mismatch"


def test_one_changed_byte_is_a_mismatch() -> None:
    header = sign(BODY, b"s1", NOW)
    with pytest.raises(SignatureError):
        verify(header, BODY.replace(b"call", b"calk"), [b"s1"], now=NOW, tolerance=1800)


@pytest.mark.parametrize(("age", "reason"), [(1801, "expired"), (-301, "future")])
def test_timestamps_outside_the_window(age: int, reason: str) -> None:
    with pytest.raises(SignatureError) as raised:
        check_timestamp(parse_header(f"t={NOW - age},v0={'a' * 64}"), NOW, 1800)
    assert raised.value.reason == reason


@pytest.mark.parametrize("age", [1800, 0, -300])
def test_timestamps_inside_the_window(age: int) -> None:
    check_timestamp(parse_header(f"t={NOW - age},v0={'a' * 64}"), NOW, 1800)


def test_whitespace_extra_elements_and_case_of_hex_are_accepted() -> None:
    digest = sign(BODY, b"s1", NOW).split("v0=")[1]
    header = f"  t={NOW} ,  v1=ignored , v0={'0' * 64},v0={digest.upper()}  "
    verify(header, BODY, [b"s1"], now=NOW, tolerance=1800)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        f"t={NOW}",
        f"v0={'a' * 64}",
        f"t=+{NOW},v0={'a' * 64}",
        f"t={NOW}.5,v0={'a' * 64}",
        f"t=١٢٣,v0={'a' * 64}",  # non-ASCII digits
        f"t={NOW},v0={'a' * 63}",
        f"t={NOW},v0={'g' * 64}",
        f"T={NOW},v0={'a' * 64}",
        f"t={NOW},V0={'a' * 64}",
        f"t={NOW},t={NOW},v0={'a' * 64}",
        f"t={NOW},,v0={'a' * 64}",
        f"t={NOW};v0={'a' * 64}",
    ],
)
def test_malformed_headers(header: str) -> None:
    with pytest.raises(SignatureError) as raised:
        parse_header(header)
    assert raised.value.reason in {"missing", "malformed"}


@given(st.text())
def test_parser_raises_only_its_own_error(header: str) -> None:
    try:
        parsed = parse_header(header)
    except SignatureError:
        return
    assert parsed.digests and all(len(d) == 32 for d in parsed.digests)


@given(
    st.lists(st.sampled_from(["t=", "v0=", "v1=", ",", " ", "=", "1", "a", "F", "0" * 64, "é", "\x00"])).map("".join)
)
def test_parser_on_header_shaped_noise(header: str) -> None:
    with contextlib.suppress(SignatureError):
        parse_header(header)


@given(body=st.binary(max_size=512), secret=st.binary(min_size=1, max_size=64), chunk=st.integers(1, 64))
def test_incremental_verification_equals_whole_body(body: bytes, secret: bytes, chunk: int) -> None:
    from service.webhook.signature import BodyVerifier

    verifier = BodyVerifier(parse_header(sign(body, secret, NOW)), [secret])
    for start in range(0, len(body), chunk):
        verifier.update(body[start : start + chunk])
    verifier.verify()
