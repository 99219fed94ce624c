"""Signing what we send, the Standard Webhooks way (https://www.standardwebhooks.com). Pure.

`webhook-signature: v1,<base64 HMAC-SHA256(secret, "<webhook-id>.<webhook-timestamp>.<body>")>`, computed by the
`standardwebhooks` reference library itself, so a receiver verifying with any Standard Webhooks library (or the
few lines in docs/deployment.md) agrees with us by construction. Each attempt is signed afresh with its own
timestamp: a receiver's replay window (5 minutes in the libraries) then never refuses a retry sent hours later.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime

from standardwebhooks import Webhook

from service import logs

PREFIX = "whsec_"
MIN_SECRET_BYTES = 24  # Standard Webhooks asks for 24 to 64 random bytes


class SigningSecretError(ValueError):
    """POSTCALL_FORWARD_SECRET is not a `whsec_<base64>` secret; `str()` says why without showing it."""


def check_secret(secret: str) -> bytes:
    """The key bytes of a `whsec_<base64>` secret, or SigningSecretError."""
    if not secret.startswith(PREFIX):
        raise SigningSecretError(f"must start with {PREFIX} followed by base64 (e.g. from `openssl rand -base64 32`)")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise SigningSecretError(f"is not {PREFIX} followed by base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise SigningSecretError(f"must hold at least {MIN_SECRET_BYTES} bytes of key (base64 of 24 random bytes)")
    return key


class Signer:
    """Headers for one attempt at one event."""

    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(check_secret(secret))
        logs.never_show(secret)

    def headers(self, event_id: str, body: str, at: datetime) -> dict[str, str]:
        at = at.astimezone(UTC)
        return {
            "webhook-id": event_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": self._webhook.sign(event_id, at, body),
        }

    def __repr__(self) -> str:
        return "Signer(<secret>)"
