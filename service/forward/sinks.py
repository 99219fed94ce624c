"""Sinks: where events go. One small interface (`send(event) -> outcome`) for every kind; pure parts only here.

A sink's `name` is what people see (`GET /v1/forward`, metric labels, `--sink`) and the key of its rows: its URL
without userinfo, query or fragment, so a token in a URL (`https://user:pass@host/hook?key=…`) never reaches a
label, an answer or a log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

# The longest a sink's name may be: it keys rows and indexes (storage/tables.py), whose btree entries must fit
# PostgreSQL's limit beside a conversation id.
MAX_SINK_NAME = 256


def sink_name(url: str) -> str:
    """`scheme://host[:port]/path` of a sink URL: no credentials, query or fragment."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme.lower(), netloc, parts.path, "", ""))


@dataclass(frozen=True)
class Outgoing:
    """One event on its way to one sink: what a sink needs to send it."""

    delivery_id: int
    event_id: str
    type: str
    agent_id: str | None
    body: str  # the event document, sent as it is stored
    committed_at: datetime


@dataclass(frozen=True)
class Outcome:
    """How one attempt went. `error` is for people (the sink's status and answer, or the failure); it never holds
    a credential."""

    delivered: bool
    latency_seconds: float
    status_code: int | None = None
    error: str | None = None


class Sink(Protocol):
    name: str
    concurrency: int  # sends in flight at once, at most
    deadline: float  # seconds one send may take at most, connecting included: the claim's lease must cover it

    async def send(self, event: Outgoing) -> Outcome: ...

    async def reachable(self) -> str | None:
        """None when the sink can be reached now (without sending anything), else why not, for a person
        (`postcall doctor`); never a credential."""
        ...

    async def aclose(self) -> None: ...
