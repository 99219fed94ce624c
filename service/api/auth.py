"""Bearer-token auth for the read API (and any later route that wraps its endpoint in `bearer_protected`).

The tokens come from `POSTCALL_API_TOKENS`. With none configured the protected routes answer 403 (the API is off,
not open); a missing or wrong token gets 401. The webhook and health endpoints are never wrapped.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response

from service.web.state import app_state

Endpoint = Callable[[Request], Awaitable[Response]]
ENABLE_HINT = (
    "the read API is disabled: set POSTCALL_API_TOKENS to a comma-separated list of bearer tokens to enable it"
)


class Unauthorized(Exception):
    """No usable `Authorization: Bearer` token; `reason` is for our logs only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ApiDisabled(Exception):
    """No token is configured, so no request can be authorized."""


def check_bearer(authorization: str | None, tokens: Sequence[bytes]) -> None:
    """Accept the header when it carries one of `tokens`; every token is compared, in constant time each."""
    if not tokens:
        raise ApiDisabled(ENABLE_HINT)
    if authorization is None:
        raise Unauthorized("missing")
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthorized("malformed")
    given = credentials.strip().encode("utf-8", "surrogateescape")
    matched = False
    for token in tokens:
        # No early exit: the time taken must not tell which token (or how much of one) matched.
        matched |= hmac.compare_digest(given, token)
    if not matched:
        raise Unauthorized("wrong token")


def configured_tokens(request: Request) -> list[bytes]:
    return [token.get_secret_value().encode() for token in app_state(request).settings.api_tokens]


def bearer_protected(endpoint: Endpoint) -> Endpoint:
    """Wrap a route endpoint so it runs only for a request with a configured bearer token."""

    @functools.wraps(endpoint)
    async def protected(request: Request) -> Response:
        check_bearer(request.headers.get("authorization"), configured_tokens(request))
        return await endpoint(request)

    protected.requires_bearer = True  # type: ignore[attr-defined]  # read by the OpenAPI document
    return protected


def requires_bearer(endpoint: object) -> bool:
    return bool(getattr(endpoint, "requires_bearer", False))
