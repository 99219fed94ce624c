"""CSRF tokens for the console's forms. Pure.

Every form that changes anything carries a hidden `csrf` field, and its POST is refused (403) without the right one:
- signed in (sign-out): the token is a MAC of the session's cookie value under the session's key (session.py), so
  it is tied to that session, needs no storage, and another site cannot read it (the cookie is HttpOnly, and the
  page it is in is same-origin only).
- signing in (no session yet, "login CSRF"): a double-submit value. The sign-in page sets a random value in a
  short-lived cookie and puts the same value in the form; another site can make a browser post the form but can
  neither read nor set that cookie, so it cannot match them.
SameSite=Lax on both cookies is a second line, not the only one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from service.console.session import Session

FIELD = "csrf"
SIGN_IN_COOKIE = "postcall_sign_in"
SIGN_IN_LIFETIME_SECONDS = 3600


def for_session(session: Session) -> str:
    mac = hmac.new(session.key, b"csrf." + session.value.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def valid_for_session(session: Session, submitted: str | None) -> bool:
    return submitted is not None and hmac.compare_digest(for_session(session).encode(), submitted.encode())


def new_sign_in_value() -> str:
    return secrets.token_urlsafe(24)


def valid_sign_in(cookie: str | None, submitted: str | None) -> bool:
    if not cookie or not submitted:
        return False
    return hmac.compare_digest(cookie.encode(), submitted.encode())
