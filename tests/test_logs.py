"""Structured logs: JSON lines off a terminal, the conversation id on lines about one, no secrets or transcripts."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.config import Settings
from service.logs import JsonFormatter, configure, dict_config, redact
from service.web.app import create_app
from tests.support import webhooks as wh


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure(logging.INFO, stream, json_lines=True)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_non_tty_stream_gets_json_lines(captured: io.StringIO) -> None:
    logging.getLogger("postcall.test").info("stored %s", "it", extra={"conversation_id": "conv_1", "payload": {"x": 1}})
    (line,) = lines(captured)
    assert line["message"] == "stored it"
    assert line["level"] == "info"
    assert line["logger"] == "postcall.test"
    assert line["conversation_id"] == "conv_1"
    assert "payload" not in line  # only the known context fields are written


def test_credentials_in_messages_are_masked() -> None:
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer [redacted]"
    assert redact("header t=1,v0=deadbeef") == "header t=1,v0=[redacted]"
    assert redact("sent xi-api-key: sk_123") == "sent xi-api-key: [redacted]"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token=s3cret here", None, None)
    assert "s3cret" not in JsonFormatter().format(record)


def test_a_webhook_logs_its_conversation_id_and_never_the_transcript_or_secrets(
    captured: io.StringIO, settings: Settings, engine: Engine
) -> None:
    body = wh.encode(wh.transcription("conv_logged"))
    with TestClient(create_app(settings, engine=engine)) as client:
        assert client.post("/webhooks/elevenlabs", content=body, headers=wh.signed_headers(body)).status_code == 200
        client.get("/v1/conversations/conv_logged", headers={"Authorization": "Bearer test-token"})
        client.get("/v1/conversations", headers={"Authorization": "Bearer not-the-token"})
    output = captured.getvalue()
    assert any(line.get("conversation_id") == "conv_logged" for line in lines(captured))
    for secret in ("Hello, how can I help?", "Just testing.", wh.SECRET, "test-token", "not-the-token"):
        assert secret not in output


def test_uvicorn_gets_the_same_formatter_in_every_worker() -> None:
    config = dict_config(json_lines=True)
    assert config["formatters"]["postcall"]["()"] == "service.logs.JsonFormatter"
    assert config["loggers"]["uvicorn.access"] == {"handlers": [], "propagate": True}
