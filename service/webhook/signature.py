"""The `ElevenLabs-Signature` header: `t=<unix secs>,v0=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.

Pure: no I/O, no web framework. The MAC is computed incrementally so a body can be verified while it streams.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

FUTURE_LIMIT_SECONDS = 300

_NAME = re.compile(r"[a-z0-9_-]+")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_V0 = re.compile(r"[0-9a-fA-F]{64}")


class SignatureError(Exception):
    """The delivery is not correctly signed. `reason` is for logs and metrics, never for the sender."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SignatureHeader:
    timestamp: int
    digests: tuple[bytes, ...]


def parse_header(value: str | None) -> SignatureHeader:
    """Parse the header strictly; raise SignatureError('missing' | 'malformed') for anything else."""
    if value is None or not value.strip():
        raise SignatureError("missing")
    timestamp: int | None = None
    digests: list[bytes] = []
    for element in value.split(","):
        name, sep, item = element.strip().partition("=")
        if not sep or not _NAME.fullmatch(name):
            raise SignatureError("malformed")
        if name == "t":
            if timestamp is not None or not _TIMESTAMP.fullmatch(item):
                raise SignatureError("malformed")
            timestamp = int(item)
        elif name == "v0":
            if not _V0.fullmatch(item):
                raise SignatureError("malformed")
            digests.append(bytes.fromhex(item))
    if timestamp is None or not digests:
        raise SignatureError("malformed")
    return SignatureHeader(timestamp, tuple(digests))


def check_timestamp(header: SignatureHeader, now: float, tolerance_seconds: int) -> None:
    """Refuse signatures older than the tolerance or more than FUTURE_LIMIT_SECONDS ahead of `now`."""
    if now - header.timestamp > tolerance_seconds:
        raise SignatureError("expired")
    if header.timestamp - now > FUTURE_LIMIT_SECONDS:
        raise SignatureError("future")


class BodyVerifier:
    """Feed the raw body in chunks, then `verify()`: any configured secret may match any `v0` digest."""

    def __init__(self, header: SignatureHeader, secrets: Sequence[bytes]) -> None:
        if not secrets:
            raise SignatureError("no_secret_configured")
        self._header = header
        prefix = f"{header.timestamp}.".encode()
        self._macs = [hmac.new(secret, prefix, hashlib.sha256) for secret in secrets]

    def update(self, chunk: bytes) -> None:
        for mac in self._macs:
            mac.update(chunk)

    def verify(self) -> None:
        # Every comparison runs, so timing does not tell which secret or digest came close.
        matched = False
        for mac in self._macs:
            computed = mac.digest()
            for digest in self._header.digests:
                matched |= hmac.compare_digest(computed, digest)
        if not matched:
            raise SignatureError("mismatch")


def sign(body: bytes, secret: bytes, timestamp: int) -> str:
    """The header ElevenLabs would send for `body`; used by send-test-webhook, the simulator and tests."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v0={mac.hexdigest()}"
