"""Domain errors become HTTP answers here and only here."""

from __future__ import annotations

import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from service import elevenlabs
from service.api.auth import ApiDisabled, Forbidden, Unauthorized
from service.api.query_params import QueryError
from service.api.routes import NotFound, RangeNotSatisfiable
from service.broker.sessions import BrokerNotConfigured, InvalidSessionRequest
from service.record.payloads import PayloadError
from service.storage.db import StoreRefused, StoreUnavailable
from service.webhook.body import BodyTooLarge, BodyTooSlow
from service.webhook.pending import PendingFull
from service.webhook.signature import SignatureError

log = logging.getLogger("postcall.web")


def error(status: int, message: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


async def signature_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignatureError)
    log.info("webhook refused: signature %s", exc.reason)
    # The reason stays in our logs: telling a forger which check failed only helps the forger.
    return error(401, "invalid signature")


async def payload_error(request: Request, exc: Exception) -> Response:
    log.info("webhook refused: %s", exc)
    return error(400, str(exc))


async def body_too_large(request: Request, exc: Exception) -> Response:
    return error(413, "body too large")


async def body_too_slow(request: Request, exc: Exception) -> Response:
    log.info("webhook refused: body arrived too slowly")
    # The sender is still connected and may keep trickling: close the connection rather than read on.
    return JSONResponse({"error": "body arrived too slowly"}, status_code=408, headers={"Connection": "close"})


async def pending_full(request: Request, exc: Exception) -> Response:
    log.warning("webhook refused: bodies not yet verified hold POSTCALL_MAX_PENDING_BYTES of disk already")
    return error(503, "too many webhook bodies in progress, try again later")


async def client_disconnected(request: Request, exc: Exception) -> Response:
    # The sender hung up mid-body: nothing was stored and nobody is left to answer. Not a server error; 499 is
    # the status proxies log for it, and what the metrics count.
    log.info("webhook abandoned: the sender disconnected before the body was complete")
    return error(499, "client disconnected")


async def store_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("storage unavailable: %s", exc)
    return error(503, "storage unavailable, try again later")


async def store_refused(request: Request, exc: Exception) -> Response:
    log.warning("write refused by the database: %s", exc)
    return error(400, "a value in this request cannot be stored")


async def invalid_session_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidSessionRequest)
    return error(422, f"{exc.field} {exc.message}", field=exc.field)


async def broker_not_configured(request: Request, exc: Exception) -> Response:
    log.warning("session refused: %s", exc)
    return error(503, str(exc))


# A Retry-After passed on to broker callers: whole seconds up to an hour; anything else ElevenLabs sends is omitted.
MAX_RETRY_AFTER_SECONDS = 3600


def upstream_answer(exc: elevenlabs.ElevenLabsError) -> tuple[int, str]:
    """The broker's answer to a failed ElevenLabs call (see the README's session broker): a refusal 502, 404 404,
    429/5xx or no answer 503, an answer postcall cannot read 502."""
    if isinstance(exc, elevenlabs.NotFound):
        return 404, "ElevenLabs does not know this agent or branch"
    if isinstance(exc, elevenlabs.Unreachable) or (isinstance(exc, elevenlabs.ApiError) and exc.retryable):
        return 503, "ElevenLabs is unavailable, try again later"
    if isinstance(exc, elevenlabs.BadAnswer):
        return 502, "ElevenLabs gave an answer postcall cannot read"
    return 502, "ElevenLabs refused the request"


def retry_after_header(exc: elevenlabs.ElevenLabsError) -> str | None:
    """The upstream's Retry-After as whole seconds when it is one a caller can use; None otherwise (absent,
    unreadable — the client reads only digits and HTTP dates — or longer than an hour)."""
    seconds = exc.retry_after if isinstance(exc, elevenlabs.ApiError) else None
    if seconds is None or seconds > MAX_RETRY_AFTER_SECONDS:
        return None
    return str(math.ceil(seconds))


async def elevenlabs_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, elevenlabs.ElevenLabsError)
    status, message = upstream_answer(exc)
    log.warning("ElevenLabs failed a session (answered %d): %s", status, exc)
    answer = error(status, f"{message}: {exc.reason}", upstream_status=exc.status, upstream_reason=exc.reason)
    retry_after = retry_after_header(exc) if status == 503 else None
    if retry_after is not None:
        answer.headers["Retry-After"] = retry_after
    return answer


async def query_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, QueryError)
    return error(422, f"{exc.parameter}: {exc.message}", parameter=exc.parameter)


async def not_found(request: Request, exc: Exception) -> Response:
    return error(404, str(exc))


async def range_not_satisfiable(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RangeNotSatisfiable)
    answer = error(416, "range not satisfiable")
    answer.headers["Content-Range"] = f"bytes */{exc.size}"
    return answer


async def unauthorized(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Unauthorized)
    log.info("read API refused: %s bearer token", exc.reason)
    answer = error(401, "missing or invalid bearer token")
    answer.headers["WWW-Authenticate"] = 'Bearer realm="postcall"'
    return answer


async def api_disabled(request: Request, exc: Exception) -> Response:
    return error(403, str(exc))


async def forbidden(request: Request, exc: Exception) -> Response:
    log.info("admin route refused to a read token: %s %s", request.method, request.url.path)
    return error(403, str(exc))


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    answer = error(exc.status_code, str(exc.detail))
    answer.headers.update(exc.headers or {})  # e.g. the Allow header of a 405
    return answer


async def unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error(500, "internal error")


EXCEPTION_HANDLERS = {
    SignatureError: signature_error,
    PayloadError: payload_error,
    BodyTooLarge: body_too_large,
    BodyTooSlow: body_too_slow,
    PendingFull: pending_full,
    ClientDisconnect: client_disconnected,
    StoreUnavailable: store_unavailable,
    StoreRefused: store_refused,
    HTTPException: http_exception,
    QueryError: query_error,
    NotFound: not_found,
    RangeNotSatisfiable: range_not_satisfiable,
    Unauthorized: unauthorized,
    ApiDisabled: api_disabled,
    Forbidden: forbidden,
    InvalidSessionRequest: invalid_session_request,
    BrokerNotConfigured: broker_not_configured,
    elevenlabs.ElevenLabsError: elevenlabs_error,
}
