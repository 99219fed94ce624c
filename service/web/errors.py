"""Domain errors become HTTP answers here and only here."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.db import StoreUnavailable
from service.events import PayloadError
from service.receiver import BodyTooLarge
from service.signature import SignatureError

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


async def store_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("storage unavailable: %s", exc)
    return error(503, "storage unavailable, try again later")


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, str(exc.detail))


async def unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error(500, "internal error")


EXCEPTION_HANDLERS = {
    SignatureError: signature_error,
    PayloadError: payload_error,
    BodyTooLarge: body_too_large,
    StoreUnavailable: store_unavailable,
    HTTPException: http_exception,
}
