"""The console's sign-in session: a signed cookie value, checked against the configured tokens. Pure but for the clock.

Why a signed value and no session table or in-memory store: any replica, and the same process after a restart,
must accept a session another one issued, with nothing shared but the configuration. So the cookie carries all
a session is — when it expires and a random nonce — and a MAC over them:

    cookie  = "<expires unix>.<nonce>.<mac>"            (nonce and mac base64url)
    key     = HMAC-SHA256(token, "postcall console session v1")
    mac     = HMAC-SHA256(key, "<expires unix>.<nonce>")

The key is derived from the token the person signed in with, so:
- the cookie holds no token, in the clear or otherwise (only a MAC, from which the token cannot be recovered);
- removing a token from POSTCALL_API_TOKENS / POSTCALL_ADMIN_TOKENS ends every session it opened: no key that
  verifies the MAC is left (and a token moved from admin to read keeps its sessions, with read rights);
- a session proves which configured token opened it, which gives its rights (admin or read), checked afresh
  against the configuration on every request.
Checking a cookie computes one MAC per configured token and compares each in constant time, without stopping at
the first match, like the bearer check (api/auth.py). A session lasts `LIFETIME` at most. Signing out clears the
cookie in the browser; a copy of the value taken before then stays valid until it expires (nothing is stored to
revoke it by): rotating the token is what ends every session at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from service.api.auth import ApiDisabled, Caller, Unauthorized, identify

COOKIE = "postcall_console"
PATH = "/console"
LIFETIME_SECONDS = 12 * 3600  # a working day; then sign in again
_KEY_LABEL = b"postcall console session v1"
_MAX_COOKIE = 256  # a genuine value is ~80 characters: anything far longer is refused before any MAC


@dataclass(frozen=True)
class Tokens:
    """The configured tokens, as bytes: read tokens and admin tokens."""

    read: Sequence[bytes]
    admin: Sequence[bytes]

    @property
    def configured(self) -> bool:
        return bool(self.read or self.admin)

    def all(self) -> list[bytes]:
        return [*self.admin, *self.read]


@dataclass(frozen=True)
class Session:
    caller: Caller
    value: str  # the cookie value, which CSRF tokens are bound to
    key: bytes  # derived from the token (never the token): signs the session and its CSRF tokens
    expires: int


def session_key(token: bytes) -> bytes:
    return hmac.new(token, _KEY_LABEL, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, expires: int, nonce: str) -> bytes:
    return hmac.new(key, f"{expires}.{nonce}".encode(), hashlib.sha256).digest()


def sign_in(given: str, tokens: Tokens, now: float) -> Session | None:
    """A new session for the token a person typed, None when it is not a configured token."""
    token = given.strip().encode("utf-8", "surrogateescape")
    if not token or not tokens.configured:
        return None
    try:
        caller = identify(f"Bearer {token.decode('utf-8', 'surrogateescape')}", tokens.read, tokens.admin)
    except (Unauthorized, ApiDisabled):
        return None
    expires = int(now) + LIFETIME_SECONDS
    nonce = _b64(secrets.token_bytes(18))
    key = session_key(token)
    value = f"{expires}.{nonce}.{_b64(_mac(key, expires, nonce))}"
    return Session(caller, value, key, expires)


def verify(value: str | None, tokens: Tokens, now: float) -> Session | None:
    """The session a cookie value holds, None when it is absent, malformed, expired or its token is gone."""
    if not value or len(value) > _MAX_COOKIE:
        return None
    parts = value.split(".")
    if len(parts) != 3 or not parts[0].isascii() or not parts[0].isdigit():
        return None
    expires, nonce = int(parts[0]), parts[1]
    try:
        mac = _unb64(parts[2])
    except (binascii.Error, ValueError):
        return None
    if expires <= now:
        return None
    found: tuple[int, bytes] | None = None
    candidates = tokens.all()
    for index, token in enumerate(candidates):
        key = session_key(token)
        if hmac.compare_digest(_mac(key, expires, nonce), mac) and found is None:
            found = (index, key)
    if found is None:
        return None
    index, key = found
    token = candidates[index]
    caller = identify(f"Bearer {token.decode('utf-8', 'surrogateescape')}", tokens.read, tokens.admin)
    return Session(caller, value, key, expires)
