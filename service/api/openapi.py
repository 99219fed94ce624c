"""`GET /openapi.json`: the OpenAPI 3.1 document, built from the app's routes.

Paths, methods and which operations need a bearer token, or an admin one, come from the routes themselves
(`auth.requires_bearer`, `auth.requires_admin`);
what each operation takes and answers is written down in `OPERATIONS` below. A route with no entry still appears
(as "undocumented"), and tests/test_openapi.py fails on it — so the document cannot silently fall behind.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.api import query_params, stats
from service.api.auth import ADMIN_HINT, ENABLE_HINT, requires_admin, requires_bearer
from service.forward import events, feed
from service.record.fields import DETAIL_ONLY, FILTERS, LISTED, Kind, RecordField
from service.search.query import MAX_QUERY_LENGTH, MAX_QUERY_WORDS
from service.storage.tables import RUN_COUNTS

UNDOCUMENTED = "undocumented"
_CONVERTOR = re.compile(r"{([^}:]+):[^}]+}")


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json({"$ref": "#/components/schemas/Error"}, description)


TIME = _nullable("string", format="date-time")
_JSON_TYPES = {
    Kind.TEXT: "string",
    Kind.INTEGER: "integer",
    Kind.NUMBER: "number",
    Kind.BOOLEAN: "boolean",
    Kind.OBJECT: "object",
    Kind.LIST: "array",
    Kind.TIMESTAMP: "string",
}


def _field_schema(field: RecordField) -> dict[str, Any]:
    """The JSON schema of one record field as the read API serves it (api/reads.py)."""
    json_type = _JSON_TYPES[field.kind]
    schema: dict[str, Any] = _nullable(json_type) if field.nullable else {"type": json_type}
    if field.kind is Kind.TIMESTAMP:
        schema["format"] = "date-time"
    if field.kind is Kind.LIST:
        schema["items"] = {"type": "object"}
    if field.choices:
        schema["enum"] = [*field.choices, None] if field.nullable else list(field.choices)
    schema["description"] = field.description
    return schema


RECORD_PROPERTIES: dict[str, Any] = {field.name: _field_schema(field) for field in LISTED}
DETAIL_PROPERTIES: dict[str, Any] = {**RECORD_PROPERTIES, **{field.name: _field_schema(field) for field in DETAIL_ONLY}}
RUN_PROPERTIES: dict[str, Any] = {
    "id": {"type": "integer"},
    "started_at": {"type": "string", "format": "date-time"},
    "finished_at": TIME,
    "status": {"type": "string", "description": "running, succeeded or failed"},
    "holder": {"type": "string"},
    "dry_run": {"type": "boolean"},
    "agents": _nullable("array"),
    "window_start_unix": _nullable("integer"),
    "window_end_unix": _nullable("integer"),
    "error": _nullable("string"),
    "warnings": _nullable("array", description="sentences for a person; the run may still have succeeded"),
    "upstream_webhook_healthy": _nullable(
        "boolean", description="the workspace's post-call webhook as ElevenLabs reported it to the run; null: unknown"
    ),
    **{name: {"type": "integer"} for name in RUN_COUNTS},
}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {"error": {"type": "string"}, "parameter": {"type": "string"}},
        "required": ["error"],
    },
    "Conversation": _object(RECORD_PROPERTIES),
    # A page answering `q` carries each record's snippet beside its fields.
    "ConversationMatch": _object(
        {
            **RECORD_PROPERTIES,
            "snippet": _nullable(
                "string",
                description="the best matching passage (transcript message, summary or title), about 200 characters "
                "around its matches, each match between « and »; null only if no passage holds a query word",
            ),
        }
    ),
    "ConversationDetail": _object(DETAIL_PROPERTIES),
    "ConversationPage": _object(
        {
            "conversations": {
                "type": "array",
                "items": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/Conversation"},
                        {"$ref": "#/components/schemas/ConversationMatch"},
                    ]
                },
                "description": "Conversation items, or ConversationMatch items (with `snippet`) when `q` is given",
            },
            "next_cursor": _nullable("string"),
            "has_more": {"type": "boolean"},
        }
    ),
    "ReconcileRun": _object(RUN_PROPERTIES),
    "ReconcileRuns": _object({"runs": {"type": "array", "items": {"$ref": "#/components/schemas/ReconcileRun"}}}),
    "Event": _object(
        {
            "id": {"type": "string", "description": "evt_…: the same on every redelivery"},
            "type": {"type": "string", "enum": list(events.TYPES)},
            "timestamp": {"type": "string", "format": "date-time", "description": "when the change committed"},
            "data": _object(
                {
                    "conversation_id": {"type": "string"},
                    "revision": {"type": "integer"},
                    "changed": {"type": "array", "items": {"type": "string"}},
                    "conversation": {
                        "$ref": "#/components/schemas/ConversationDetail",
                        "description": "the record at this revision; absent on conversation.deleted",
                    },
                }
            ),
        }
    ),
    "EventPage": _object(
        {
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
            "next_cursor": {"type": "string", "description": "pass as `after` for the events that follow"},
        }
    ),
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


TEXT_PARAMETER = {
    "type": "string",
    "minLength": 1,
    "maxLength": query_params.MAX_VALUE_LENGTH,
    "pattern": "^[^\\u0000]*$",
}
TIME_PARAMETER = {
    "anyOf": [
        {"type": "string", "pattern": "^[0-9]{1,11}(\\.[0-9]{1,9})?$", "description": "unix seconds"},
        {"type": "string", "format": "date-time"},
    ]
}


def _exact_parameter(field: RecordField) -> dict[str, Any]:
    """`?<field>=<value>`: the record's field equals the value (record/fields.py `filter`)."""
    if field.kind is Kind.BOOLEAN:
        return _query(field.name, {"type": "boolean"}, f"{field.description}: true or false")
    return _query(field.name, TEXT_PARAMETER, f"{field.description}: exactly this value")


LIST_PARAMETERS = [
    *(_exact_parameter(field) for field in FILTERS),
    _query("started_after", TIME_PARAMETER, "start time at or after this (unix seconds or ISO-8601; no zone = UTC)"),
    _query("started_before", TIME_PARAMETER, "start time before this (unix seconds or ISO-8601; no zone = UTC)"),
    _query("source", {"type": "string", "enum": list(query_params.SOURCES)}, "how postcall first learnt of it"),
    _query(
        "q",
        {**TEXT_PARAMETER, "maxLength": MAX_QUERY_LENGTH},
        "full-text search of the transcript's messages, the summary and the title: words separated by anything "
        "that is not a letter or digit, every one of which must match a whole word, case and accents ignored "
        f"(at most {MAX_QUERY_WORDS} different words; nothing in it is an operator). Each result carries `snippet`",
    ),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": query_params.MAX_LIMIT}, "page size (default 50)"),
    _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
]
CONVERSATION_ID = {"name": "conversation_id", "in": "path", "required": True, "schema": {"type": "string"}}
UNAVAILABLE = _error("the database is unavailable")

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/v1/conversations"): {
        "summary": "List stored conversations, newest start first",
        "description": (
            "Keyset pagination: pass `next_cursor` as `cursor` until `has_more` is false. Ties in start time are "
            "broken by `conversation_id` (descending); conversations without a start time come last. Besides the "
            "parameters below, `var.<name>=<value>` matches a dynamic variable (the name may hold dots: "
            "`var.customer.name`) and `label.<name>=<value>` a session label (a value that reads as a number or "
            "true/false also matches that JSON type); at most "
            f"{query_params.MAX_JSON_FILTERS} of them together. Send a `+` in a value (a phone "
            "number) as `%2B`. Unknown or repeated parameters are refused with 422."
        ),
        "parameters": LIST_PARAMETERS,
        "responses": {
            "200": _json({"$ref": "#/components/schemas/ConversationPage"}, "a page of conversations"),
            "422": _error("a query parameter is unusable; `parameter` names it"),
            "503": UNAVAILABLE,
        },
    },
    ("GET", "/v1/conversations/{conversation_id}"): {
        "summary": "One conversation with its transcript, analysis, metadata, client data and provenance",
        "parameters": [CONVERSATION_ID],
        "responses": {
            "200": _json({"$ref": "#/components/schemas/ConversationDetail"}, "the stored record"),
            "404": _error("no conversation with this id is stored"),
            "503": UNAVAILABLE,
        },
    },
    ("DELETE", "/v1/conversations/{conversation_id}"): {
        "summary": "Erase a conversation for good (admin token)",
        "description": (
            "Deletes the record, its audio and its archived webhook bodies, and keeps a tombstone (the id and when, "
            "nothing else): a late webhook is answered 200 `ignored` and the reconciler and the session broker never "
            "store it again. Each erasure is in the erase log (which admin token, when, how many), without personal "
            "data. `postcall erase` does the same for many conversations, or every conversation of a user_id."
        ),
        "parameters": [CONVERSATION_ID],
        "responses": {
            "204": {"description": "erased"},
            "404": _error("no conversation with this id is stored (an erased one included)"),
            "503": UNAVAILABLE,
        },
    },
    ("GET", "/v1/conversations/{conversation_id}/audio"): {
        "summary": "The conversation's audio (MP3), with Range support",
        "description": (
            "One `bytes` range is answered 206; a range starting past the end is 416. Several ranges, another "
            "unit or an If-Range header: the whole file with 200."
        ),
        "parameters": [
            CONVERSATION_ID,
            {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"}},
        ],
        "responses": {
            "200": {"description": "the whole file", "content": {"audio/mpeg": {}}},
            "206": {"description": "the requested range", "content": {"audio/mpeg": {}}},
            "404": _error("unknown conversation, or no audio stored"),
            "416": _error("the range starts beyond the end of the file"),
            "503": UNAVAILABLE,
        },
    },
    ("GET", "/v1/reconcile/runs"): {
        "summary": "Recent reconcile runs and their counts, newest first",
        "parameters": [
            _query(
                "limit", {"type": "integer", "minimum": 1, "maximum": query_params.MAX_RUNS}, "how many (default 20)"
            )
        ],
        "responses": {
            "200": _json({"$ref": "#/components/schemas/ReconcileRuns"}, "the runs"),
            "422": _error("a query parameter is unusable; `parameter` names it"),
            "503": UNAVAILABLE,
        },
    },
    ("GET", "/v1/events"): {
        "summary": "Every change of every conversation, in commit order (a consumer never skips one)",
        "parameters": [
            _query("after", {"type": "string"}, "next_cursor of the previous answer; none: from the oldest kept"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": feed.MAX_PAGE}, "at most this many (100)"),
            _query("wait", {"type": "integer", "minimum": 0, "maximum": feed.MAX_WAIT_SECONDS}, "seconds to long-poll"),
        ],
        "responses": {
            "200": _json({"$ref": "#/components/schemas/EventPage"}, "the events after the cursor"),
            "422": _error("a query parameter is unusable; `parameter` names it"),
            "503": UNAVAILABLE,
        },
    },
    ("GET", "/v1/forward"): {
        "summary": "Each forwarding sink's backlog, dead events and last news",
        "description": (
            "`pending` counts every event the sink has yet to acknowledge: waiting for a first try or a retry, or "
            "not yet handed to it. A sink is named by its URL without credentials or query."
        ),
        "responses": {
            "200": _json(
                _object(
                    {
                        "sinks": {
                            "type": "array",
                            "items": _object(
                                {
                                    "sink": {"type": "string"},
                                    "pending": {"type": "integer"},
                                    "dead": {"type": "integer", "description": "given up on after 3 days; replayable"},
                                    "oldest_pending_seconds": _nullable("number"),
                                    "last_success_at": TIME,
                                    "last_error": _nullable("string"),
                                }
                            ),
                        }
                    }
                ),
                "one entry per configured sink",
            ),
            "503": UNAVAILABLE,
        },
    },
    ("POST", "/v1/forward/replay"): {
        "summary": "Send the events committed since a moment again, with their ids (admin token)",
        "description": "To every sink, or the one named; nothing is added to the event feed.",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["since"],
                        "additionalProperties": False,
                        "properties": {
                            "since": {
                                "anyOf": [{"type": "string"}, {"type": "integer"}],
                                "description": "7d, ISO-8601 or unix seconds",
                            },
                            "sink": {"type": "string", "description": "a sink's name as GET /v1/forward shows it"},
                        },
                    }
                }
            },
        },
        "responses": {
            "200": _json(
                _object(
                    {
                        "replayed": {"type": "integer", "description": "deliveries made pending again"},
                        "since": {"type": "string", "format": "date-time"},
                        "sinks": {"type": "array", "items": {"type": "string"}},
                    }
                ),
                "the replay is under way",
            ),
            "413": _error("body too large"),
            "422": _json(
                {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "field": {"type": "string"}},
                    "required": ["error", "field"],
                },
                "the body is unusable (`field` names what), or the sink is not configured",
            ),
            "503": UNAVAILABLE,
        },
    },
    ("POST", "/v1/sessions"): {
        "summary": "Start a session: fetch a WebRTC token or WebSocket signed URL and record the conversation",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["agent_id", "transport"],
                        "properties": {
                            "agent_id": {"type": "string"},
                            "transport": {"type": "string", "enum": ["webrtc", "websocket"]},
                            "participant_name": {"type": "string"},
                            "branch_id": {"type": "string"},
                            "environment": {"type": "string"},
                            "user_id": {"type": "string"},
                            "labels": {"type": "object"},
                        },
                    }
                }
            },
        },
        "responses": {
            "200": _json(
                {
                    "type": "object",
                    "required": ["conversation_id", "agent_id"],
                    "properties": {
                        "conversation_id": _nullable("string"),
                        "agent_id": {"type": "string"},
                        "token": {"type": "string"},
                        "signed_url": {"type": "string"},
                    },
                },
                "the token or signed URL, and the conversation it opens",
            ),
            "404": _error("ElevenLabs does not know this agent or branch"),
            "413": _error("body too large"),
            "422": _error("the body is unusable"),
            "502": _error("ElevenLabs refused the request or answered unreadably"),
            "503": _error("ElevenLabs or the database is unavailable"),
        },
    },
    ("POST", "/webhooks/elevenlabs"): {
        "summary": "ElevenLabs post-call webhook (signed with HMAC; no bearer token)",
        "parameters": [
            {
                "name": "ElevenLabs-Signature",
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": 't=<unix secs>,v0=<hex HMAC-SHA256(secret, "<t>.<raw body>")>',
            }
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
        "responses": {
            "200": _json(
                {
                    "type": "object",
                    "required": ["status", "conversation_id"],
                    "properties": {
                        "status": {"type": "string", "enum": ["accepted", "duplicate", "ignored"]},
                        "conversation_id": _nullable("string"),
                    },
                },
                "stored durably (or a duplicate, or an ignored type)",
            ),
            "400": _error("correctly signed, but not JSON or without data.conversation_id"),
            "401": _error("missing, malformed or non-matching signature, or a timestamp outside the window"),
            "408": _error("the body arrived slower than the minimum pace (10 s grace, then 64 KiB/s on average)"),
            "413": _error("body too large"),
            "503": _error("storage unavailable; the reconciler fills the gap later"),
        },
    },
    ("GET", "/healthz"): {
        "summary": "The process is up",
        "responses": {"200": _json({"type": "object", "properties": {"status": {"const": "ok"}}}, "up")},
    },
    ("GET", "/readyz"): {
        "summary": "The database answers",
        "responses": {
            "200": _json({"type": "object", "properties": {"status": {"const": "ready"}}}, "ready"),
            "503": UNAVAILABLE,
        },
    },
    ("GET", "/metrics"): {
        "summary": "Prometheus metrics",
        "responses": {"200": {"description": "text exposition format", "content": {"text/plain": {}}}},
    },
    ("GET", "/openapi.json"): {
        "summary": "This document",
        "responses": {"200": _json({"type": "object"}, "the OpenAPI 3.1 document")},
    },
}

# GET /v1/stats (api/stats.py says what each count means).
_STAT_COUNTS = {name: {"type": "integer", "minimum": 0} for name in stats.COUNTS}
SCHEMAS["StatsDay"] = _object(
    {"agent_id": _nullable("string"), "day": {"type": "string", "format": "date"}, **_STAT_COUNTS}
)
SCHEMAS["Stats"] = _object(
    {"days": {"type": "array", "items": {"$ref": "#/components/schemas/StatsDay"}}, "totals": _object(_STAT_COUNTS)}
)
OPERATIONS[("GET", "/v1/stats")] = {
    "summary": "Conversations per agent and UTC day of their start: by webhook, found only by the reconciler, "
    "failed initiations, with audio",
    "description": (
        "`by_webhook`: a webhook brought it; `reconcile_only`: no webhook ever did and the reconciler found it "
        "(what the webhooks missed); `failed_initiations`: status `failed`; `with_audio`: postcall holds its audio. "
        "Conversations without a start time are not counted. Newest day first."
    ),
    "parameters": [
        _query(
            "days",
            {"type": "integer", "minimum": 1, "maximum": stats.MAX_DAYS},
            f"the last N UTC days, today included (default {stats.DEFAULT_DAYS})",
        )
    ],
    "responses": {
        "200": _json({"$ref": "#/components/schemas/Stats"}, "the counts"),
        "422": _error("a query parameter is unusable; `parameter` names it"),
        "503": UNAVAILABLE,
    },
}

AUTH_RESPONSES = {
    "401": _error("missing or wrong bearer token"),
    "403": _error(f"no token is configured ({ENABLE_HINT})"),
}
ADMIN_RESPONSES = {
    **AUTH_RESPONSES,
    "403": _error(f"a read token ({ADMIN_HINT}), or no token is configured ({ENABLE_HINT})"),
}


def openapi_path(route: Route) -> str:
    """`/things/{id:int}` → `/things/{id}`."""
    return _CONVERTOR.sub(r"{\1}", route.path)


def document(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            paths.setdefault(openapi_path(route), {})[method.lower()] = _operation(route, method)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "postcall",
            "version": "1",
            "description": "A complete, queryable record of ElevenLabs voice-agent conversations.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(route: Route, method: str) -> dict[str, Any]:
    documented = OPERATIONS.get((method, openapi_path(route)))
    operation: dict[str, Any] = copy.deepcopy(documented) if documented else {"summary": UNDOCUMENTED, "responses": {}}
    operation["operationId"] = f"{method.lower()}_{route.name}"
    if requires_bearer(route.endpoint):
        operation["security"] = [{"bearer": []}]
        auth = ADMIN_RESPONSES if requires_admin(route.endpoint) else AUTH_RESPONSES
        operation["responses"].update(copy.deepcopy(auth))
    else:
        operation["security"] = []
    if not operation["responses"]:
        operation["responses"] = {"default": {"description": UNDOCUMENTED}}
    return operation


async def serve(request: Request) -> Response:
    return JSONResponse(document(request.app.routes))


def routes() -> list[Route]:
    return [Route("/openapi.json", serve, methods=["GET"])]
