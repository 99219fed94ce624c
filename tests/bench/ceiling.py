"""The verify-and-parse ceiling: read the body, check the HMAC, `json.loads` it, store nothing.

Served with the same interpreter and uvicorn settings as postcall, it is what the ingest benchmark divides by.
"""

from __future__ import annotations

import json
import os
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.webhook.signature import BodyVerifier, SignatureError, check_timestamp, parse_header


def build() -> Starlette:
    secrets = [os.environ["POSTCALL_WEBHOOK_SECRETS"].encode()]

    async def receive(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            # The receiver's steps (webhook/routes.py), with the whole body in one chunk.
            header = parse_header(request.headers.get("elevenlabs-signature"))
            check_timestamp(header, time.time(), 1800)
            verifier = BodyVerifier(header, secrets)
            verifier.update(body)
            verifier.verify()
        except SignatureError:
            return JSONResponse({"error": "invalid signature"}, status_code=401)
        payload = json.loads(body)
        return JSONResponse({"status": "accepted", "conversation_id": payload["data"]["conversation_id"]})

    return Starlette(routes=[Route("/webhooks/elevenlabs", receive, methods=["POST"])])
