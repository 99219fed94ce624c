"""Domain errors become HTTP answers here and only here."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from service.api.auth import ApiDisabled, Unauthorized
from service.api.query_params import QueryError
from service.api.routes import NotFound, RangeNotSatisfiable
from service.broker.sessions import BrokerNotConfigured, InvalidSessionRequest, UpstreamError, UpstreamKind
from service.record.payloads import PayloadError
from service.storage.db import StoreUnavailable
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


async def invalid_session_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidSessionRequest)
    return error(422, f"{exc.field} {exc.message}", field=exc.field)


async def broker_not_configured(request: Request, exc: Exception) -> Response:
    log.warning("session refused: %s", exc)
    return error(503, str(exc))


UPSTREAM_ANSWERS = {
    UpstreamKind.REJECTED: (502, "ElevenLabs refused the request"),
    UpstreamKind.NOT_FOUND: (404, "ElevenLabs does not know this agent or branch"),
    UpstreamKind.UNAVAILABLE: (503, "ElevenLabs is unavailable, try again later"),
    UpstreamKind.BAD_ANSWER: (502, "ElevenLabs gave an answer postcall cannot read"),
}


async def upstream_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, UpstreamError)
    status, message = UPSTREAM_ANSWERS[exc.kind]
    log.warning("ElevenLabs %s (%s): %s", exc.kind.value, exc.upstream_status, exc.reason)
    answer = error(status, f"{message}: {exc.reason}", upstream_status=exc.upstream_status, upstream_reason=exc.reason)
    if exc.retry_after is not None and status == 503:
        answer.headers["Retry-After"] = exc.retry_after
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
    HTTPException: http_exception,
    QueryError: query_error,
    NotFound: not_found,
    RangeNotSatisfiable: range_not_satisfiable,
    Unauthorized: unauthorized,
    ApiDisabled: api_disabled,
    InvalidSessionRequest: invalid_session_request,
    BrokerNotConfigured: broker_not_configured,
    UpstreamError: upstream_error,
}
