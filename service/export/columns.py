"""Each field's stored values, a whole column at a time, as a format writes them. Pure.

The read API builds one dict per record (record/public.py's `public_record`) and tests each value's type; for a
million records that was most of an export's time. Here each column gets one function, chosen once from its
field's kind (record/fields.py), and mapped over the column: a column that needs nothing is passed on untouched.

The values come as the columns' SQLAlchemy types read them (export/query.py); what they become is what the read
API serves: timestamps as its ISO-8601 text (`iso`), JSON of the wrong shape (an object field holding a list) as
null, JSON as the API's JSON text (`json_text`) where a format writes text. tests/test_export.py pins the bytes
of every format to the read API's answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from service.api.routes import json_bytes
from service.record import fields
from service.record.fields import Kind
from service.record.public import iso

Convert = Callable[[Any], Any]


def json_text(value: Any) -> Any:
    """An object or list as the API's JSON, as text; None stays None."""
    return value if value is None else json_bytes(value).decode()


def _timestamp(value: datetime | None) -> str | None:
    return value if value is None else iso(value)


def _object(value: Any) -> Any:
    return value if isinstance(value, dict) else None


def _list(value: Any) -> Any:
    return value if isinstance(value, list) else None


def _object_text(value: Any) -> str | None:
    return json_bytes(value).decode() if isinstance(value, dict) else None


def _list_text(value: Any) -> str | None:
    return json_bytes(value).decode() if isinstance(value, list) else None


def _boolean_text(value: bool | None) -> str | None:
    return value if value is None else ("true" if value else "false")


# The read API's value of each kind; a kind not named here is served as stored.
API_VALUE: dict[Kind, Convert] = {Kind.TIMESTAMP: _timestamp, Kind.OBJECT: _object, Kind.LIST: _list}
# Where a format writes text: booleans as true/false, JSON as its text (the API's value otherwise).
TEXT_VALUE: dict[Kind, Convert] = {
    **API_VALUE,
    Kind.OBJECT: _object_text,
    Kind.LIST: _list_text,
    Kind.BOOLEAN: _boolean_text,
}


def converters(names: Sequence[str], by_kind: dict[Kind, Convert]) -> list[Convert | None]:
    """Each named field's function from `by_kind`, or None where its values need none."""
    return [by_kind.get(fields.BY_NAME[name].kind) for name in names]


def convert(columns: Sequence[Sequence[Any]], functions: Sequence[Convert | None]) -> list[Sequence[Any]]:
    """Each column through its function (a new list), or as it is when it has none."""
    return [
        column if function is None else list(map(function, column))
        for column, function in zip(columns, functions, strict=True)
    ]
