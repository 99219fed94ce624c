"""GET /openapi.json: every route is in the document as it behaves, and schemathesis finds nothing to break."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from service.api.auth import requires_bearer
from service.api.openapi import UNDOCUMENTED, openapi_path
from service.config import Settings
from service.reconcile.ledger import Counts, Report, finish_run, start_run
from service.reconcile.windows import Window
from service.record.fields import FIELDS
from service.storage.db import transaction
from service.web.app import create_app
from tests.support import records

AUTH = {"Authorization": "Bearer test-token"}
AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
# Routes whose behaviour needs a counterpart schemathesis cannot play: ElevenLabs (the session broker).
NOT_FUZZED = ["/v1/sessions"]


@pytest.fixture
def app(settings: Settings, engine: Engine) -> Iterator[Starlette]:
    records.store(
        engine,
        [
            records.detail("conv_1", user_id="alice", dynamic_variables={"k": "v"}),
            records.session("conv_2", labels={"room": "r"}),
            records.audio("conv_1", settings.data_dir, b"ID3" + bytes(200)),
        ],
    )
    report = Report(Counts(listed=3), agents=["agent_a"], dry_run=False, warnings=["the post-call webhook is off"])
    run_id = transaction(engine, lambda conn: start_run(conn, "test holder", AT))
    transaction(engine, lambda conn: finish_run(conn, run_id, report, [Window(100, 200)], AT))
    application = create_app(settings, engine=engine)
    with TestClient(application):  # runs the lifespan, so the app's state exists while schemathesis calls it
        yield application


@pytest.fixture
def document(app: Starlette) -> dict[str, Any]:
    with TestClient(app) as client:
        answer = client.get("/openapi.json")
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


def app_routes(app: Starlette) -> list[tuple[str, str, Route]]:
    found = []
    for route in app.routes:
        if isinstance(route, Route) and route.include_in_schema:  # as openapi.document() reads them
            found += [
                (method.lower(), openapi_path(route), route) for method in route.methods or () if method != "HEAD"
            ]
    return found


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_route_is_documented_with_its_auth(app: Starlette, document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    routes = app_routes(app)
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == {(method, path) for method, path, _ in routes}
    for method, path, route in routes:
        operation = document["paths"][path][method]
        assert operation["summary"] != UNDOCUMENTED, f"{method.upper()} {path} has no entry in openapi.OPERATIONS"
        if requires_bearer(route.endpoint):
            assert operation["security"] == [{"bearer": []}]
            assert {"401", "403"} <= set(operation["responses"])
        else:
            assert operation["security"] == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_documented_answers_match_the_routes(app: Starlette, document: dict[str, Any]) -> None:
    with TestClient(app) as client:
        for path, method, status, headers in [
            ("/v1/conversations", "get", 200, AUTH),
            ("/v1/conversations?limit=0", "get", 422, AUTH),
            ("/v1/conversations", "get", 401, {}),
            ("/v1/conversations/conv_1", "get", 200, AUTH),
            ("/v1/conversations/nope", "get", 404, AUTH),
            ("/v1/conversations/conv_1/audio", "get", 200, AUTH),
            ("/v1/reconcile/runs", "get", 200, AUTH),
            ("/healthz", "get", 200, {}),
            ("/readyz", "get", 200, {}),
            ("/metrics", "get", 200, {}),
            ("/webhooks/elevenlabs", "post", 401, {}),
        ]:
            answer = client.request(method, path, headers=headers)
            assert answer.status_code == status, path
            template = path.split("?")[0].replace("conv_1", "{conversation_id}").replace("nope", "{conversation_id}")
            assert str(status) in document["paths"][template][method]["responses"], (path, status)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_record_schemas_name_what_the_api_serves_in_its_order(app: Starlette, document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    with TestClient(app) as client:
        listed = client.get("/v1/conversations", headers=AUTH).json()["conversations"]
        detail = client.get("/v1/conversations/conv_1", headers=AUTH).json()
        run = client.get("/v1/reconcile/runs", headers=AUTH).json()["runs"][0]
    served_and_schemas = [
        (listed[0], schemas["Conversation"]),
        (detail, schemas["ConversationDetail"]),
        (run, schemas["ReconcileRun"]),
    ]
    for served, schema in served_and_schemas:
        assert list(schema["properties"]) == list(served) == schema["required"]
    for schema in (schemas["Conversation"], schemas["ConversationDetail"]):
        assert all(prop["description"] for prop in schema["properties"].values())
    assert {field.name for field in FIELDS} == set(schemas["ConversationDetail"]["properties"])


def test_schemathesis_finds_no_500_and_no_answer_off_the_schema(app: Starlette) -> None:
    """Every operation, about 30 generated requests each (with the token, and without it for the auth checks)."""
    api = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path=NOT_FUZZED)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 8
    calls: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            # An opaque cursor is a string to the schema yet only the API's own cursors are accepted (422 for
            # the rest), so "every schema-valid request is accepted" cannot hold; every other check runs.
            response = case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])
            calls.append(response.status_code)

        check()
    assert len(calls) > 10 * len(operations)  # the run really generated requests
    assert 500 not in calls
