"""The web console's pages, under `/console`: sign-in and sign-out, the conversation list, one conversation (and its
audio), coverage. Server-rendered; the one script (static/console.js) only seeks the audio player.

Reads go through the read API's own functions (api/reads.py, api/stats.py, the `/audio` streaming of
api/routes.py), so the console shows exactly what the API serves. Every page without a valid session redirects to
the sign-in page (303, a relative Location); every POST needs its CSRF token (csrf.py) and gets 403 without it.

Forwarding's backlog comes through a hook, `forward_backlog`: a function of a database connection returning one
dict per sink (the shape of `GET /v1/forward`'s `sinks`). Without one the coverage page says forwarding is not
configured.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from jinja2 import Environment
from sqlalchemy.engine import Connection
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from service.api import reads, stats
from service.api import routes as api_routes
from service.api.query_params import SOURCES, ConversationFilter, QueryError, encode_cursor, parse_filter
from service.console import csrf, render
from service.console.headers import SecurityHeaders
from service.console.session import COOKIE, LIFETIME_SECONDS, PATH, Session, Tokens, sign_in, verify
from service.record.fields import FILTERS
from service.record.merge import STATUS_RANK
from service.record.payloads import valid_conversation_id
from service.record.public import RECORD_FIELDS
from service.web.state import app_state

log = logging.getLogger("postcall.console")

ForwardBacklog = Callable[[Connection], list[dict[str, Any]]]
Page = Callable[[Request, Session], Awaitable[Response]]

SIGN_IN = f"{PATH}/sign-in"
CONVERSATIONS = f"{PATH}/conversations"
COVERAGE = f"{PATH}/coverage"
MAX_FORM_BYTES = 8 * 1024  # a token and a CSRF value: anything larger is not our form
RECENT_RUNS = 10
COVERAGE_DAYS = 14
WRONG_TOKEN = "That token is not one of POSTCALL_API_TOKENS or POSTCALL_ADMIN_TOKENS."  # noqa: S105 (a message)
DISABLED = (
    "The console is disabled: set POSTCALL_API_TOKENS (read) or POSTCALL_ADMIN_TOKENS to a comma-separated list "
    "of tokens, then sign in with one of them."
)
# The list form's choices; text filters are typed in.
CHOICES: dict[str, tuple[str, ...]] = {
    "status": tuple(STATUS_RANK),
    "call_successful": ("success", "failure", "unknown"),
    "source": SOURCES,
    "has_audio": ("true", "false"),
    "audio_stored": ("true", "false"),
}
TEXT_FILTERS = tuple(entry.name for entry in FILTERS if entry.name not in CHOICES)


class FormTooLarge(Exception):
    pass


class Console:
    def __init__(self, forward_backlog: ForwardBacklog | None) -> None:
        self.templates: Environment = render.environment()
        self.forward_backlog = forward_backlog

    def html(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.templates.get_template(name).render(**context), status_code=status)

    def page(self, name: str, session: Session, status: int = 200, **context: Any) -> HTMLResponse:
        return self.html(name, status, caller=session.caller, csrf=csrf.for_session(session), **context)


def _tokens(request: Request) -> Tokens:
    settings = app_state(request).settings
    return Tokens(
        read=[token.get_secret_value().encode() for token in settings.api_tokens],
        admin=[token.get_secret_value().encode() for token in settings.admin_tokens],
    )


def _session(request: Request) -> Session | None:
    return verify(request.cookies.get(COOKIE), _tokens(request), app_state(request).clock())


def _secure(request: Request) -> bool:
    """Secure cookies when the browser reached us over https (directly, or through a proxy uvicorn trusts)."""
    public_url = app_state(request).settings.public_url or ""
    return request.url.scheme == "https" or public_url.startswith("https://")


async def home(request: Request) -> Response:
    return RedirectResponse(CONVERSATIONS if _session(request) else SIGN_IN, status_code=303)


def signed_in(page: Page) -> Callable[[Request], Awaitable[Response]]:
    @functools.wraps(page)
    async def endpoint(request: Request) -> Response:
        session = _session(request)
        if session is None:
            return RedirectResponse(SIGN_IN, status_code=303)
        return await page(request, session)

    return endpoint


async def _form(request: Request) -> dict[str, str]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormTooLarge
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def routes(forward_backlog: ForwardBacklog | None = None) -> list[BaseRoute]:
    """The console's routes, to mount at /console (`mount`)."""
    console = Console(forward_backlog)

    async def sign_in_form(request: Request) -> Response:
        if _session(request) is not None:
            return RedirectResponse(CONVERSATIONS, status_code=303)
        return _sign_in_page(request)

    def _sign_in_page(request: Request, error: str | None = None, status: int = 200) -> Response:
        value = csrf.new_sign_in_value()
        disabled = not _tokens(request).configured
        answer = console.html("sign_in.html", status, csrf=value, error=error or (DISABLED if disabled else None))
        answer.set_cookie(
            csrf.SIGN_IN_COOKIE,
            value,
            max_age=csrf.SIGN_IN_LIFETIME_SECONDS,
            path=SIGN_IN,
            secure=_secure(request),
            httponly=True,
            samesite="strict",
        )
        return answer

    async def sign_in_submit(request: Request) -> Response:
        try:
            form = await _form(request)
        except FormTooLarge:
            return console.html("error.html", 413, message="That form is too large.")
        if not csrf.valid_sign_in(request.cookies.get(csrf.SIGN_IN_COOKIE), form.get(csrf.FIELD)):
            return _sign_in_page(request, "The sign-in form expired or came from elsewhere: please try again.", 403)
        tokens = _tokens(request)
        if not tokens.configured:
            return _sign_in_page(request, DISABLED, 403)
        session = sign_in(form.get("token", ""), tokens, app_state(request).clock())
        if session is None:
            log.info("console sign-in refused: wrong token")
            return _sign_in_page(request, WRONG_TOKEN, 401)
        log.info("console sign-in by %s", session.caller.name)
        answer = RedirectResponse(CONVERSATIONS, status_code=303)
        answer.set_cookie(
            COOKIE,
            session.value,
            max_age=LIFETIME_SECONDS,
            path=PATH,
            secure=_secure(request),
            httponly=True,
            samesite="lax",  # a link to a conversation from mail or chat opens it; every POST carries CSRF
        )
        answer.delete_cookie(csrf.SIGN_IN_COOKIE, path=SIGN_IN)
        return answer

    async def sign_out(request: Request, session: Session) -> Response:
        try:
            form = await _form(request)
        except FormTooLarge:
            return console.html("error.html", 413, message="That form is too large.")
        if not csrf.valid_for_session(session, form.get(csrf.FIELD)):
            return console.page("error.html", session, 403, message="This form's CSRF token is missing or wrong.")
        log.info("console sign-out by %s", session.caller.name)
        answer = RedirectResponse(SIGN_IN, status_code=303)
        answer.delete_cookie(COOKIE, path=PATH, secure=_secure(request), httponly=True, samesite="lax")
        return answer

    async def conversations(request: Request, session: Session) -> Response:
        given = [(name, value) for name, value in request.query_params.multi_items() if value.strip()]
        try:
            wanted, search = _parse_filter(given)
        except QueryError as exc:
            context = _list_context(given, search=True)
            return console.page("conversations.html", session, 422, error=f"{exc.parameter}: {exc.message}", **context)
        page = await api_routes.read(request, lambda conn: reads.list_conversations(conn, wanted))
        next_url = None
        if page.next_cursor is not None:
            kept = [(name, value) for name, value in given if name != "cursor"]
            next_url = f"{CONVERSATIONS}?{urlencode([*kept, ('cursor', encode_cursor(page.next_cursor))])}"
        context = _list_context(given, search=search)
        return console.page(
            "conversations.html", session, records=page.records, next_url=next_url, error=None, **context
        )

    async def conversation(request: Request, session: Session) -> Response:
        conversation_id: str = request.path_params["conversation_id"]
        record = None
        if valid_conversation_id(conversation_id):
            record = await api_routes.read(request, lambda conn: reads.get_conversation(conn, conversation_id))
        if record is None:
            return console.page("error.html", session, 404, message="No conversation with this id is stored.")
        return console.page(
            "conversation.html",
            session,
            record=record,
            fields=[(name, record[name]) for name in RECORD_FIELDS if name not in _SHOWN_APART],
            turns=render.turns(record.get("transcript")),
            criteria=render.analysis_rows(record.get("analysis"), "evaluation_criteria_results", "result"),
            collected=render.analysis_rows(record.get("analysis"), "data_collection_results", "value"),
        )

    async def audio(request: Request, session: Session) -> Response:
        return await api_routes.get_audio(request)  # the read API's streaming, Range and all

    async def coverage(request: Request, session: Session) -> Response:
        days = COVERAGE_DAYS
        if "days" in request.query_params:
            try:
                days = stats.parse_days(request.query_params.multi_items())
            except QueryError as exc:
                return console.page("error.html", session, 422, message=f"{exc.parameter}: {exc.message}")
        now = app_state(request).clock()
        backlog = console.forward_backlog

        def work(conn: Connection) -> dict[str, Any]:
            return {
                "stats": stats.daily_stats(conn, days, now),
                "runs": reads.recent_runs(conn, RECENT_RUNS),
                "sinks": backlog(conn) if backlog is not None else None,
            }

        found = await api_routes.read(request, work)
        return console.page("coverage.html", session, days=days, **found)

    return [
        Route("/", home, methods=["GET"]),
        Route("/sign-in", sign_in_form, methods=["GET"]),
        Route("/sign-in", sign_in_submit, methods=["POST"]),
        Route("/sign-out", signed_in(sign_out), methods=["POST"]),
        Route("/conversations", signed_in(conversations), methods=["GET"]),
        Route("/conversations/{conversation_id}", signed_in(conversation), methods=["GET"]),
        Route("/conversations/{conversation_id}/audio", signed_in(audio), methods=["GET"]),
        Route("/coverage", signed_in(coverage), methods=["GET"]),
        Mount("/static", StaticFiles(packages=[("service.console", "static")]), name="console_static"),
    ]


def mounted(forward_backlog: ForwardBacklog | None = None) -> list[BaseRoute]:
    """The console for the app: everything under /console with its security headers (headers.py), and /console
    itself, which only redirects."""
    pages = routes(forward_backlog)
    return [
        Route(PATH, home, methods=["GET"], include_in_schema=False),  # pages, not API: not in /openapi.json
        Mount(PATH, routes=pages, middleware=[Middleware(SecurityHeaders)]),
    ]


# Shown in sections of their own on a conversation's page, not in the field table.
_SHOWN_APART = frozenset({"dynamic_variables", "labels", "call_summary_title", "transcript_summary"})


def _parse_filter(given: list[tuple[str, str]]) -> tuple[ConversationFilter, bool]:
    """The API's filter from the form's values, and whether full-text search (`q`) is available.

    Search is built beside the console: until the read API knows `q`, it refuses it as an unknown parameter, and
    the list is shown unsearched with a note rather than refused."""
    try:
        return parse_filter(given), True
    except QueryError as exc:
        if exc.parameter != "q" or not exc.message.startswith("unknown parameter"):
            raise
    return parse_filter([(name, value) for name, value in given if name != "q"]), False


def _list_context(given: list[tuple[str, str]], *, search: bool) -> dict[str, Any]:
    values = dict(given)
    return {
        "values": values,
        "json_filters": [(name, value) for name, value in given if name.startswith(("var.", "label."))],
        "choices": CHOICES,
        "text_filters": TEXT_FILTERS,
        "search": search,
        "filtered": any(name not in ("cursor", "limit") for name in values),
    }
