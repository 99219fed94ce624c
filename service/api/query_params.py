"""The list endpoint's query parameters → a typed `ConversationFilter`. Pure: no Starlette, no SQL.

Every parameter is checked here, so nothing a client writes in a query string can reach the database in a shape
it would refuse (a NUL byte, a number beyond BIGINT, a malformed cursor): anything unusable is a `QueryError`
naming the parameter, which the web layer answers with 422.

Ordering (see reads.py): newest `start_time_unix_secs` first, ties by `conversation_id` descending; records
without a start time come after every dated record (they sort as the oldest), among themselves by
`conversation_id` descending. The cursor is the sort key of the last record of a page.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from service.record.fields import FILTERS, Kind
from service.record.payloads import valid_conversation_id
from service.search import query as search_query

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
SOURCES = ("webhook", "reconcile", "session")
MAX_VALUE_LENGTH = 1024
# `var.` and `label.` filters together: each is an OR of JSON lookups with bound values, so 1,000 of them went past
# SQLite's limit on bound variables (a 503) and took 2.2 s on PostgreSQL. Nobody narrows by more than a few.
MAX_JSON_FILTERS = 20
# Year 9999: anything later is not a start time, and keeps every bound inside a BIGINT.
MAX_UNIX_SECONDS = 253_402_300_799
# Names inside `var.<name>` / `label.<name>`: what dynamic variable names hold (dots too: `var.customer.name` is
# the variable named "customer.name"), and safe inside a quoted SQLite JSON path key (no quote, no backslash).
_KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_UNIX = re.compile(r"\d{1,15}(\.\d{1,9})?")
_NUMBER = re.compile(r"-?(0|[1-9]\d{0,15})(\.\d{1,15})?")

# The record's fields a list is filtered on by equality (record/fields.py `filter`): text, or true/false.
EXACT_PARAMETERS = {entry.name: entry.kind for entry in FILTERS}
DOCUMENTED_PARAMETERS = (*EXACT_PARAMETERS, "started_after", "started_before", "source", "q", "limit", "cursor")


class QueryError(Exception):
    """A query parameter postcall cannot use; `parameter` names it, `message` says why."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message


@dataclass(frozen=True)
class Cursor:
    """The sort key of the last record already returned: the next page starts strictly after it."""

    start_time_unix_secs: int | None
    conversation_id: str


@dataclass(frozen=True)
class JsonMatch:
    """`var.<name>=<value>` or `label.<name>=<value>`: the stored object's key equals the value.

    The value matches a stored string equal to it; when it reads as a number or `true`/`false` it also matches
    that JSON number or boolean (dynamic variables may be any of the three).
    """

    name: str
    text: str

    @property
    def number(self) -> int | float | None:
        if not _NUMBER.fullmatch(self.text):
            return None
        # An integer straight from its digits: through a float, 9007199254740993 would become ...992.
        return float(self.text) if "." in self.text else int(self.text)

    @property
    def boolean(self) -> bool | None:
        return {"true": True, "false": False}.get(self.text)


@dataclass(frozen=True)
class ConversationFilter:
    equal: Mapping[str, str | bool] = field(default_factory=dict)  # field name → the value it must hold
    started_after: int | None = None  # inclusive
    started_before: int | None = None  # exclusive
    first_seen_via: str | None = None
    variables: tuple[JsonMatch, ...] = ()
    labels: tuple[JsonMatch, ...] = ()
    search: search_query.Search | None = None  # `q`: every word must match (search/query.py)
    limit: int = DEFAULT_LIMIT
    after: Cursor | None = None


def parse_filter(params: Iterable[tuple[str, str]]) -> ConversationFilter:
    """Read the list endpoint's query parameters (as (name, value) pairs, repeats included)."""
    seen: set[str] = set()
    values: dict[str, Any] = {}
    equal: dict[str, str | bool] = {}
    variables: list[JsonMatch] = []
    labels: list[JsonMatch] = []
    for name, raw in params:
        if name in seen:
            raise QueryError(name, "given more than once")
        seen.add(name)
        if name.startswith("var."):
            variables.append(_json_match(name, "var.", raw))
        elif name.startswith("label."):
            labels.append(_json_match(name, "label.", raw))
        elif name in EXACT_PARAMETERS:
            equal[name] = parse_bool(name, raw) if EXACT_PARAMETERS[name] is Kind.BOOLEAN else _exact_text(name, raw)
        elif name in ("started_after", "started_before"):
            values[name] = parse_time(name, raw)
        elif name == "source":
            if raw not in SOURCES:
                raise QueryError(name, f"must be one of {', '.join(SOURCES)}")
            values["first_seen_via"] = raw
        elif name == "q":
            values["search"] = _search(name, raw)
        elif name == "limit":
            values[name] = whole_number(name, raw, MAX_LIMIT)
        elif name == "cursor":
            values["after"] = decode_cursor(raw)
        else:
            raise QueryError(
                name, "unknown parameter (filters: " + ", ".join(DOCUMENTED_PARAMETERS) + ", var.<name>, label.<name>)"
            )
        if len(variables) + len(labels) > MAX_JSON_FILTERS:
            raise QueryError(name, f"at most {MAX_JSON_FILTERS} var. and label. filters may be given together")
    return ConversationFilter(equal=equal, **values, variables=tuple(variables), labels=tuple(labels))


def _exact_text(name: str, raw: str) -> str:
    if name == "phone_number" and raw.startswith(" "):
        # A query string decodes '+' to a space: `?phone_number=+15551234567` arrives as " 15551234567".
        raise QueryError(name, "starts with a space: send a leading '+' as %2B")
    return _text(name, raw)


def _text(name: str, raw: str) -> str:
    if not raw:
        raise QueryError(name, "must not be empty")
    if len(raw) > MAX_VALUE_LENGTH:
        raise QueryError(name, f"longer than {MAX_VALUE_LENGTH} characters")
    if "\x00" in raw:  # the one character PostgreSQL text cannot hold
        raise QueryError(name, "contains a NUL character")
    return raw


def _search(name: str, raw: str) -> search_query.Search:
    """`q`: refused when empty, or past the limits search/query.py states; any other text is words to match."""
    try:
        search = search_query.parse(raw)  # first: its length limit is q's, not MAX_VALUE_LENGTH
    except search_query.SearchRefused as exc:
        raise QueryError(name, str(exc)) from None
    _text(name, raw)
    return search


def _json_match(name: str, prefix: str, raw: str) -> JsonMatch:
    key = name[len(prefix) :]
    if not _KEY_NAME.fullmatch(key):
        raise QueryError(name, "the name after the prefix must be 1-128 letters, digits, '_', '-' or '.'")
    return JsonMatch(key, _text(name, raw))


def parse_time(name: str, raw: str) -> int:
    """Unix seconds or ISO-8601 (a time without a zone is UTC) → whole unix seconds, rounded up.

    Rounding up is exact for both bounds because stored start times are whole seconds: `start >= 10.5` and
    `start < 10.5` are `start >= 11` and `start < 11`.
    """
    text = raw.strip()
    if _UNIX.fullmatch(text):
        seconds = float(text)
    else:
        try:
            moment = datetime.fromisoformat(text.upper())  # RFC 3339 allows a lower-case 't' and 'z'
        except ValueError:
            raise QueryError(name, "must be unix seconds or an ISO-8601 date-time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        try:
            seconds = moment.timestamp()
        except (OverflowError, OSError, ValueError):
            raise QueryError(name, "is out of range") from None
    whole = math.ceil(seconds)
    if whole > MAX_UNIX_SECONDS:
        raise QueryError(name, "must be before the year 10000")
    return whole  # an ISO time before 1970 is negative: no start time is that early, and it fits a BIGINT


def parse_bool(name: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise QueryError(name, "must be true or false")


def whole_number(name: str, raw: str, maximum: int, minimum: int = 1) -> int:
    """A bounded whole-number parameter; anything else is a QueryError naming it."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6 or not minimum <= int(raw) <= maximum:
        raise QueryError(name, f"must be a whole number from {minimum} to {maximum}")
    return int(raw)


def only_parameters(params: Iterable[tuple[str, str]], names: Sequence[str]) -> dict[str, str]:
    """The parameters of an endpoint that takes only `names`, each at most once; anything else is a QueryError."""
    given: dict[str, str] = {}
    for name, raw in params:
        if name in given:
            raise QueryError(name, "given more than once")
        if name not in names:
            raise QueryError(name, f"unknown parameter (this endpoint takes only {', '.join(names)})")
        given[name] = raw
    return given


def encode_cursor(cursor: Cursor) -> str:
    payload = json.dumps([cursor.start_time_unix_secs, cursor.conversation_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> Cursor:
    """The inverse of `encode_cursor`; anything else is a QueryError, never a crash."""
    try:
        decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        start, conversation_id = json.loads(decoded)
    except (binascii.Error, ValueError, TypeError):
        raise QueryError("cursor", "is not a cursor this API returned") from None
    start_ok = start is None or (type(start) is int and 0 <= abs(start) <= 2**62)
    if not start_ok or not valid_conversation_id(conversation_id):
        raise QueryError("cursor", "is not a cursor this API returned")
    return Cursor(start, conversation_id)


DEFAULT_RUNS = 20
MAX_RUNS = 200


def parse_runs_limit(params: Iterable[tuple[str, str]]) -> int:
    """`GET /v1/reconcile/runs` takes only `limit` (default 20, at most 200)."""
    given = only_parameters(params, ("limit",))
    return whole_number("limit", given["limit"], MAX_RUNS) if "limit" in given else DEFAULT_RUNS
