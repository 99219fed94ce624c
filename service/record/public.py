"""A record as the read API serves it, from a stored row or a record just merged. Pure.

One shape for every way out: the read API's answers, export, and the events forwarding sends (an event carries
the record "as GET /v1/conversations/{id} returned it then"), so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from service.record import fields

# The record's fields (record/fields.py): the list answer's, in order; the single record adds DETAIL_FIELDS.
RECORD_FIELDS = tuple(entry.name for entry in fields.LISTED)
DETAIL_FIELDS = tuple(entry.name for entry in fields.DETAIL_ONLY)
# The JSON a field must hold to be served as it is; anything else reads as absent (null).
_JSON_SHAPES: dict[str, type] = {
    entry.name: dict if entry.kind is fields.Kind.OBJECT else list for entry in fields.FIELDS if entry.is_json
}


def public_record(row: Mapping[Any, Any], extra: Sequence[str] = ()) -> dict[str, Any]:
    """A row as the API shows it: timestamps ISO-8601 UTC, absent objects null, nothing else."""
    record = {name: plain(row[name]) for name in (*RECORD_FIELDS, *extra)}
    for name, shape in _JSON_SHAPES.items():
        if name in record and not isinstance(record[name], shape):
            record[name] = None
    return record


def plain(value: Any) -> Any:
    """A stored value as JSON serves it: a timestamp as ISO-8601 UTC, anything else as it is."""
    if isinstance(value, datetime):
        return iso(value)
    return value


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
