"""What forwarding says about a change of a conversation: the event document of README "Forwarding". Pure.

    {"id": "evt_…", "type": "conversation.created" | "conversation.updated" | "conversation.deleted",
     "timestamp": "<ISO-8601 UTC of the commit>",
     "data": {"conversation_id", "revision", "changed": [names], "conversation": <the record; absent on deleted>}}

An event exists for each new revision of a record (record/merge.py `revised`): a new record, or a new value of a
field that counts as content. A delivery that changes nothing, or only a provenance time (a reconcile that sees the
record again), adds none, so an event's `revision` names it together with its `conversation_id`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from service.record.public import DETAIL_FIELDS, RECORD_FIELDS, iso, public_record

CREATED = "conversation.created"
UPDATED = "conversation.updated"
DELETED = "conversation.deleted"
TYPES = (CREATED, UPDATED, DELETED)

# The record in an event is the whole one, as GET /v1/conversations/{id} serves it.
_SERVED = (*RECORD_FIELDS, *DETAIL_FIELDS)


@dataclass(frozen=True)
class Event:
    """An event and the columns the outbox keeps beside its body (forward_event)."""

    event_id: str
    type: str
    conversation_id: str
    agent_id: str | None
    revision: int
    committed_at: datetime
    body: str  # the document as served and sent, built once


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def change_event(before: Mapping[str, Any] | None, after: Mapping[str, Any], at: datetime) -> Event:
    """The event of `after`, a record at a new revision, whose previous revision was `before` (None: created).

    `changed` names every served field whose value changed, compared as served (so a timestamp or a JSON value
    that reads back the same is no change); on a new record, every field that has a value."""
    served = public_record(after, extra=DETAIL_FIELDS)
    if before is None:
        changed = [name for name in _SERVED if served[name] is not None]
    else:
        earlier = public_record(before, extra=DETAIL_FIELDS)
        changed = [name for name in _SERVED if earlier[name] != served[name]]
    data = {
        "conversation_id": served["conversation_id"],
        "revision": served["revision"],
        "changed": changed,
        "conversation": served,
    }
    return _event(CREATED if before is None else UPDATED, data, served["agent_id"], at)


def deleted_event(conversation_id: str, agent_id: str | None, last_revision: int, at: datetime) -> Event:
    """The one trace an erased conversation leaves in the feed: its id, and a revision after its last one."""
    data = {"conversation_id": conversation_id, "revision": last_revision + 1, "changed": []}
    return _event(DELETED, data, agent_id, at)


def _event(kind: str, data: dict[str, Any], agent_id: str | None, at: datetime) -> Event:
    event_id = new_event_id()
    document = {"id": event_id, "type": kind, "timestamp": iso(at), "data": data}
    return Event(
        event_id=event_id,
        type=kind,
        conversation_id=data["conversation_id"],
        agent_id=agent_id,
        revision=data["revision"],
        committed_at=at,
        body=orjson.dumps(document).decode(),
    )
