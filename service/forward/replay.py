"""Replay: send the events committed since a moment again, with their ids, to every sink or one of them.

Nothing is added to the feed: the deliveries of those events become pending again (forward/deliveries.py
`replay`), and the dispatchers send them in revision order as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy.engine import Engine

from service.forward import deliveries
from service.reconcile.windows import WindowError, parse_instant
from service.storage.db import transaction


class ReplayError(ValueError):
    """A replay that cannot be done as asked; `field` names what was wrong, `str()` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_since(text: str, now: datetime) -> datetime:
    """`7d`, ISO-8601 or unix seconds, as `postcall reconcile --since` takes them."""
    try:
        return datetime.fromtimestamp(parse_instant(text, int(now.timestamp())), UTC)
    except (WindowError, OverflowError, OSError, ValueError) as exc:
        raise ReplayError("since", str(exc)) from None


def choose_sinks(configured: Sequence[str], sink: str | None) -> list[str]:
    """Every configured sink, or the one named (by its name as GET /v1/forward shows it)."""
    if not configured:
        raise ReplayError("sink", "no forwarding sink is configured (POSTCALL_FORWARD_URLS, POSTCALL_FORWARD_NATS_URL)")
    if sink is None:
        return list(configured)
    if sink not in configured:
        raise ReplayError("sink", f"not a configured sink; these are: {', '.join(configured)}")
    return [sink]


def replay(engine: Engine, names: Sequence[str], since: datetime, now: datetime) -> int:
    """How many deliveries were made pending again."""
    return transaction(engine, lambda conn: deliveries.replay(conn, names, since, now))
