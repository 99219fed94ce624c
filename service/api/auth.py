"""Bearer-token auth for the API: read routes (`bearer_protected`) and admin routes (`admin_protected`).

Two kinds of token. `POSTCALL_API_TOKENS` read (and search, and start sessions); `POSTCALL_ADMIN_TOKENS` may also
erase, and can do all a read token can. With no token of either kind configured every protected route answers 403
(the API is off, not open); a missing or wrong token gets 401; a read token on an admin route 403. The webhook and
health endpoints are never wrapped.

A caller is named for audit logs by the kind and position of its token ("admin token 2": the second of
POSTCALL_ADMIN_TOKENS), never by the token itself.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import Response

from service.web.state import app_state

Endpoint = Callable[[Request], Awaitable[Response]]
AdminEndpoint = Callable[[Request, "Caller"], Awaitable[Response]]
ENABLE_HINT = (
    "the API is disabled: set POSTCALL_API_TOKENS (read) or POSTCALL_ADMIN_TOKENS (read and erase) to a "
    "comma-separated list of bearer tokens to enable it"
)
ADMIN_HINT = "this route needs an admin token (one of POSTCALL_ADMIN_TOKENS)"
NO_ADMIN_HINT = "this route needs an admin token: none is configured; set POSTCALL_ADMIN_TOKENS to enable it"


class Unauthorized(Exception):
    """No usable `Authorization: Bearer` token; `reason` is for our logs only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ApiDisabled(Exception):
    """No token is configured, so no request can be authorized."""


class Forbidden(Exception):
    """A valid token of a kind that may not do this (a read token on an admin route); `str()` says what would."""


@dataclass(frozen=True)
class Caller:
    """Who made an authorized request: `admin` or not, and a name for audit logs that is not the token."""

    admin: bool
    name: str


def check_bearer(authorization: str | None, tokens: Sequence[bytes]) -> int:
    """The position in `tokens` of the one the header carries; every token is compared, in constant time each."""
    if not tokens:
        raise ApiDisabled(ENABLE_HINT)
    if authorization is None:
        raise Unauthorized("missing")
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthorized("malformed")
    given = credentials.strip().encode("utf-8", "surrogateescape")
    found = -1
    for index, token in enumerate(tokens):
        # No early exit: the time taken must not tell how much of a token matched. Which position matched may
        # show in a branch of a few nanoseconds; that tells nothing about any token's content.
        if hmac.compare_digest(given, token) and found < 0:
            found = index
    if found < 0:
        raise Unauthorized("wrong token")
    return found


def identify(authorization: str | None, read_tokens: Sequence[bytes], admin_tokens: Sequence[bytes]) -> Caller:
    """The caller a header names, whatever its kind; ApiDisabled when no token is configured, Unauthorized when
    the header carries none of them. A token configured as both kinds is an admin token."""
    index = check_bearer(authorization, [*admin_tokens, *read_tokens])
    if index < len(admin_tokens):
        return Caller(admin=True, name=f"admin token {index + 1}")
    return Caller(admin=False, name=f"read token {index - len(admin_tokens) + 1}")


def _tokens(secrets: Sequence[SecretStr]) -> list[bytes]:
    return [token.get_secret_value().encode() for token in secrets]


def caller_of(request: Request) -> Caller:
    settings = app_state(request).settings
    return identify(request.headers.get("authorization"), _tokens(settings.api_tokens), _tokens(settings.admin_tokens))


def bearer_protected(endpoint: Endpoint) -> Endpoint:
    """Wrap a route endpoint so it runs only for a request with a configured bearer token (either kind)."""

    @functools.wraps(endpoint)
    async def protected(request: Request) -> Response:
        caller_of(request)
        return await endpoint(request)

    protected.requires_bearer = True  # type: ignore[attr-defined]  # read by the OpenAPI document
    return protected


def admin_protected(endpoint: AdminEndpoint) -> Endpoint:
    """Wrap an admin route's endpoint: it runs only for an admin token, and is told who called (for audit logs)."""

    @functools.wraps(endpoint)
    async def protected(request: Request) -> Response:
        caller = caller_of(request)
        if not caller.admin:
            raise Forbidden(ADMIN_HINT if app_state(request).settings.admin_tokens else NO_ADMIN_HINT)
        return await endpoint(request, caller)

    protected.requires_bearer = True  # type: ignore[attr-defined]  # read by the OpenAPI document
    protected.requires_admin = True  # type: ignore[attr-defined]
    return protected


def requires_bearer(endpoint: object) -> bool:
    return bool(getattr(endpoint, "requires_bearer", False))


def requires_admin(endpoint: object) -> bool:
    return bool(getattr(endpoint, "requires_admin", False))
