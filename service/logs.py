"""Structured logs: one JSON object per line when standard error is not a terminal, readable lines when it is.

A line that concerns one conversation carries its `conversation_id` (pass it as `extra={"conversation_id": …}`).
Only the context fields named in `CONTEXT_FIELDS` are ever written, so an `extra` holding a payload, a transcript
or a header cannot leak into the logs by accident; and anything shaped like a credential (a bearer token, an
`xi-api-key`, a webhook signature) is masked in every message. So is every value handed to `never_show` (the
ElevenLabs API key, by the client that sends it) wherever it appears: an upstream that echoes the key in its status
line would otherwise put it into httpx's own `HTTP Request:` line.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

CONTEXT_FIELDS = (
    "conversation_id",
    "agent_id",
    "event_type",
    "outcome",
    "run_id",
    "method",
    "path",
    "status",
    "duration_ms",
)
MASK = "[redacted]"
_CREDENTIALS = re.compile(
    r"(?i)((?:authorization[\"':=\s]+)?bearer\s+|authorization[\"':=\s]+|xi-api-key[\"':=\s]+|v0=|api_key=|token=)"
    r"[^\s,;&\"']+"
)


# Shorter values are not hidden: masking every "abc" in every line would hide more than it protects, and no
# credential postcall holds is that short.
MIN_HIDDEN_CHARS = 8
# A tuple replaced whole, never changed in place: threads format lines while another may add a value.
_hidden: tuple[str, ...] = ()


def never_show(secret: str) -> None:
    """Mask `secret` in every log line this process writes from now on, whichever logger writes it.

    Process-wide on purpose, like logging itself: it reaches loggers postcall does not own (httpx, uvicorn) and
    worker processes that configure logging from a dict and never see the settings."""
    global _hidden
    if len(secret) >= MIN_HIDDEN_CHARS and secret not in _hidden:
        _hidden = (*_hidden, secret)


def redact(text: str) -> str:
    for secret in _hidden:
        text = text.replace(secret, MASK)
    return _CREDENTIALS.sub(lambda match: match.group(1) + MASK, text)


def _context(record: logging.LogRecord) -> dict[str, Any]:
    fields = {name: getattr(record, name) for name in CONTEXT_FIELDS if getattr(record, name, None) is not None}
    return {name: redact(value) if isinstance(value, str) else value for name, value in fields.items()}


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", <context fields>, "exception"?}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            **_context(record),
        }
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    """For a person at a terminal: the usual line, context fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        context = " ".join(f"{name}={value}" for name, value in _context(record).items())
        return f"{line} {context}" if context else line


def configure(level: int = logging.INFO, stream: TextIO | None = None, json_lines: bool | None = None) -> None:
    """Route every logger (uvicorn's included) to one handler on `stream` (standard error by default)."""
    stream = sys.stderr if stream is None else stream
    if json_lines is None:
        json_lines = not stream.isatty()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's own handlers would print a second, unstructured copy of each line.
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def dict_config(level: int = logging.INFO, json_lines: bool | None = None) -> dict[str, Any]:
    """The same setup as `configure`, as a `logging.config.dictConfig` mapping.

    For uvicorn's `log_config`: each worker process applies it at start, which a setup done in the parent
    process (spawned workers inherit none of it) would not reach.
    """
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    formatter = JsonFormatter if json_lines else ConsoleFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"postcall": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "postcall", "stream": "ext://sys.stderr"}
        },
        "root": {"level": logging.getLevelName(level), "handlers": ["stderr"]},
        "loggers": {
            name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
