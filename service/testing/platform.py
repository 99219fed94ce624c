"""A fake ElevenLabs platform: a real Starlette app, served on a real port, over a seeded set of conversations.

It answers what postcall calls, shaped like ElevenLabs' models:

    GET /v1/convai/agents                         {"agents": [...], "next_cursor", "has_more"}; deleted agents
                                                  are not listed
    GET /v1/convai/conversations                  agent_id (optional: without it, the whole workspace, deleted
                                                  agents' conversations included), call_start_after_unix,
                                                  call_start_before_unix (both exclusive), page_size (1..100, else
                                                  422; default 30), summary_mode (exclude, the default: no
                                                  `transcript_summary`; include), cursor (opaque; 422 if unknown);
                                                  newest first, {"conversations": [...], "next_cursor", "has_more"}
    GET /v1/convai/conversations/{id}             the detail; 404 if unknown
    DELETE /v1/convai/conversations/{id}          deletes it (200 {}): no longer listed, fetched or its audio
                                                  served; 404 if unknown. `fail(…, kinds={"delete"})` refuses
    GET /v1/convai/conversations/{id}/audio       audio/mpeg; 404 when the conversation has no audio
    GET /v1/workspace/webhooks                    {"webhooks": [...]} (WorkspaceWebhookListResponseModel)
    GET /v1/convai/settings                       {"webhooks": {"post_call_webhook_id", "events",
                                                  "transcript_format", "send_audio"}, …}
    GET /v1/convai/conversation/token             ?agent_id[&participant_name][&branch_id][&environment]
                                                  → {"token": <LiveKit-style JWT>}, room "room_<conversation id>_…"
    GET /v1/convai/conversation/get-signed-url    ?agent_id&include_conversation_id=true
                                                  → {"signed_url": "wss://…", "conversation_id": "conv_…"}

Every request needs the `xi-api-key` it was built with (else 401) and is logged in `calls` (time, path, query,
status, the request's and the answer's headers). On demand it answers 429 with `Retry-After` (`throttle`), 500
for chosen conversation ids (`failing_ids`) or any error status for chosen kinds (`fail`), slowly (`latency`,
or `stall` for chosen kinds), with a body cut off (`truncate`) or replaced (`answer_with`), with a list cursor that
repeats (`repeat_cursors`) or is new each time and never ends (`endless_cursors`), with summaries that lack their
start time (`summaries_without_start`), audio that answers an error status for chosen ids (`audio_faults`), and
keeps conversations `processing` until a test finishes them (`set_status`). Its workspace has one post-call
webhook, healthy until a test says otherwise (`set_webhook`).

Python API, for tests and for the session broker's tests:

    platform = FakePlatform(api_key="k", conversations=seed_conversations(50, now=int(time.time())))
    with platform.serve() as base_url:              # uvicorn in a thread, on a free loopback port
        platform.throttle(2, retry_after="1")       # the next 2 requests get 429 + Retry-After: 1
        platform.failing_ids.add(conversation_id)   # its detail and audio answer 500 until removed
        platform.set_status(conversation_id, "done")
        cid = platform.mint(agent_id)               # what the token / signed-url endpoints do: a new `initiated`
                                                    # conversation, started now; returns its id
        platform.complete(cid)                      # it becomes `done` with a transcript, is listed as such,
                                                    # and `platform.transcription_event(cid)` is its webhook
        platform.calls_to("detail")                 # the logged calls of one kind
        platform.pause(); platform.resume()         # hold every request unanswered, then let them go
        platform.fail(3, status=503, kinds={"list"})  # the next 3 list requests answer 503 (times=None: until
                                                    # clear_faults())
        platform.truncate(1, kinds={"detail"})      # the next detail answers 200 with its JSON cut in half
        platform.truncate(1, abort=True)            # … or promises the whole body and drops the connection halfway
        platform.stall(2.0, None, kinds={"list"})   # list requests wait 2 s before answering, until clear_faults()
        platform.repeat_cursors = True              # a list page asked for with a cursor hands that cursor back
        platform.endless_cursors = True             # every list page says has_more, under a cursor never seen yet
        platform.answer_with({}, 1, kinds={"list"}) # the next list answer is 200 with this JSON instead of a page
                                                    # (or this Response, as it stands)
        platform.audio_faults[conversation_id] = 400  # its audio answers 400 until removed
        platform.delete_agent("agent_x")            # gone from the agent list; its conversations are still listed
        platform.set_webhook(is_auto_disabled=True, most_recent_failure_error_code=503,
                             most_recent_failure_timestamp=int(time.time()))  # the post-call webhook's state
        platform.post_call_webhook_id = None        # the ConvAI settings name no post-call webhook
        platform.clear_faults()                     # every fault above (and throttles) off (not the webhook's state)

`WebhookSender` (service/testing/webhooks.py) posts a conversation's signed webhooks to a URL.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.testing.dataset import FakeConversation, new_conversation_id

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 30
AUDIO_BYTES = 32 * 1024
JWT_KEY = b"fake-livekit-api-secret"
TOKEN_TTL_SECONDS = 600
ENDLESS_CURSOR = "endless-"
SUMMARY_MODES = ("exclude", "include")
POST_CALL_WEBHOOK_ID = "wh_fake_post_call"
DEFAULT_WEBHOOK_URL = "https://postcall.example.com/webhooks/elevenlabs"


@dataclass(frozen=True)
class Call:
    at: float  # time.monotonic() when the request arrived
    kind: str  # agents | list | detail | audio | token | signed_url | delete
    path: str
    query: dict[str, str]
    status: int
    request_headers: dict[str, str]
    response_headers: dict[str, str]


@dataclass
class FakeWebhook:
    """One workspace webhook (WorkspaceWebhookResponseModel). `retry_enabled` is left out of the answer when None:
    ElevenLabs' list does not document it."""

    webhook_id: str = POST_CALL_WEBHOOK_ID
    name: str = "postcall"
    webhook_url: str = DEFAULT_WEBHOOK_URL
    auth_type: str = "hmac"
    is_disabled: bool = False
    is_auto_disabled: bool = False
    created_at_unix: int = 1_700_000_000
    most_recent_failure_error_code: int | None = None
    most_recent_failure_timestamp: int | None = None
    retry_enabled: bool | None = None

    def answer(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "webhook_id": self.webhook_id,
            "webhook_url": self.webhook_url,
            "is_disabled": self.is_disabled,
            "is_auto_disabled": self.is_auto_disabled,
            "created_at_unix": self.created_at_unix,
            "auth_type": self.auth_type,
            "usage": [{"usage_type": "ConvAI Settings"}],
            "most_recent_failure_error_code": self.most_recent_failure_error_code,
            "most_recent_failure_timestamp": self.most_recent_failure_timestamp,
        }
        if self.retry_enabled is not None:
            body["retry_enabled"] = self.retry_enabled
        return body


@dataclass
class _Throttle:
    remaining: int
    retry_after: str
    kinds: frozenset[str] | None


@dataclass
class _Fault:
    """One on-demand fault: it applies to the next `remaining` requests of `kinds` (any kind when None), or to
    every one of them until `clear_faults()` when `remaining` is None."""

    remaining: int | None
    kinds: frozenset[str] | None
    status: int = 500  # for `fail`
    abort: bool = False  # for `truncate`
    seconds: float = 0.0  # for `stall`
    body: Any = None  # for `answer_with`

    def take(self, kind: str) -> bool:
        """Whether this fault applies to a request of `kind`; counts it down if so."""
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


class _Aborted(Exception):
    """Raised mid-body by a cut-off answer: the server drops the connection, as a crashed proxy would."""


class _CutOff(Response):
    """Headers that promise the whole body, then half of it, then a dropped connection."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: len(self.body) // 2], "more_body": True})
        raise _Aborted("answer cut off on purpose")


@dataclass
class FakePlatform:
    api_key: str = "fake-api-key"
    conversations: Iterable[FakeConversation] = ()
    agents: tuple[str, ...] = ()
    latency: float = 0.0  # seconds added to every answer
    audio_bytes: int = AUDIO_BYTES
    failing_ids: set[str] = field(default_factory=set)
    calls: list[Call] = field(default_factory=list)
    log_calls: bool = True  # off for benchmarks with very many calls
    repeat_cursors: bool = False  # a list page asked for with a cursor answers has_more with that same cursor
    endless_cursors: bool = False  # every list page answers has_more with a new cursor (its first page again)
    summaries_without_start: set[str] = field(default_factory=set)  # ids listed without start_time_unix_secs
    audio_faults: dict[str, int] = field(default_factory=dict)  # conversation id → the status its audio answers
    webhooks: list[FakeWebhook] = field(default_factory=lambda: [FakeWebhook()])
    post_call_webhook_id: str | None = POST_CALL_WEBHOOK_ID
    webhook_events: list[str] | None = field(default_factory=lambda: ["transcript", "call_initiation_failure"])
    transcript_format: str = "json"

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._by_id: dict[str, FakeConversation] = {}
        # (-start, id): ascending order is newest first, as the API lists; one index in all and one per agent.
        self._order: dict[str | None, list[tuple[int, str]]] = {None: []}
        self._throttles: list[_Throttle] = []
        self._failures: list[_Fault] = []
        self._truncations: list[_Fault] = []
        self._replacements: list[_Fault] = []
        self._stalls: list[_Fault] = []
        self._unstall = threading.Event()  # set by `clear_faults()`: the stalls in progress end with it
        self._agents = list(self.agents)
        self._deleted_agents: set[str] = set()
        self._cursors: dict[str, tuple[int, str]] = {}  # opaque cursor → the last (-start, id) of its page
        self.in_flight = 0
        self._running = threading.Event()  # cleared by `pause()`
        self._running.set()
        self.peak_in_flight = 0  # the most requests it was answering at once
        for conversation in self.conversations:
            self.add(conversation)
        self.conversations = ()  # the index holds them; do not keep a second reference to the input

    # --- the data set ----------------------------------------------------------------------------------------

    def add(self, conversation: FakeConversation) -> None:
        with self._lock:
            if conversation.conversation_id in self._by_id:
                raise ValueError(f"duplicate conversation {conversation.conversation_id}")
            self._by_id[conversation.conversation_id] = conversation
            key = (-conversation.start_time_unix_secs, conversation.conversation_id)
            bisect.insort(self._order[None], key)
            bisect.insort(self._order.setdefault(conversation.agent_id, []), key)
            if conversation.agent_id not in self._agents and conversation.agent_id not in self._deleted_agents:
                self._agents.append(conversation.agent_id)

    def remove(self, conversation_id: str) -> FakeConversation:
        """What `DELETE /v1/convai/conversations/{id}` does: the conversation is gone from lists and details."""
        with self._lock:
            conversation = self._by_id.pop(conversation_id)
            key = (-conversation.start_time_unix_secs, conversation_id)
            for order in (self._order[None], self._order[conversation.agent_id]):
                order.pop(bisect.bisect_left(order, key))
            return conversation

    def delete_agent(self, agent_id: str) -> None:
        """The agent is deleted: no longer in `GET /v1/convai/agents` (nor can a session start with it), while its
        conversations stay listed, as ElevenLabs keeps them."""
        with self._lock:
            self._deleted_agents.add(agent_id)
            if agent_id in self._agents:
                self._agents.remove(agent_id)

    def set_webhook(self, **state: Any) -> None:
        """Change the post-call webhook's fields (FakeWebhook's: is_disabled, is_auto_disabled, webhook_url,
        auth_type, most_recent_failure_error_code, most_recent_failure_timestamp, retry_enabled…)."""
        with self._lock:
            webhook = next(w for w in self.webhooks if w.webhook_id == POST_CALL_WEBHOOK_ID)
            for name, value in state.items():
                if not hasattr(webhook, name):
                    raise AttributeError(f"a webhook has no {name!r}")
                setattr(webhook, name, value)

    def get(self, conversation_id: str) -> FakeConversation:
        with self._lock:
            return self._by_id[conversation_id]

    def all(self) -> list[FakeConversation]:
        with self._lock:
            return [self._by_id[cid] for _, cid in self._order[None]]

    @property
    def agent_ids(self) -> list[str]:
        with self._lock:
            return list(self._agents)

    def set_status(self, conversation_id: str, status: str) -> None:
        with self._lock:
            self._by_id[conversation_id].status = status

    def mint(
        self,
        agent_id: str,
        *,
        participant_name: str | None = None,
        branch_id: str | None = None,
        environment: str | None = None,
    ) -> str:
        """A new conversation, `initiated` and started now, as a session start creates it; returns its id."""
        conversation = FakeConversation(
            conversation_id=new_conversation_id(),
            agent_id=agent_id,
            start_time_unix_secs=int(time.time()),
            status="initiated",
            call_duration_secs=0,
            user_id=participant_name,
            branch_id=branch_id,
            environment=environment,
        )
        self.add(conversation)
        return conversation.conversation_id

    def complete(self, conversation_id: str, *, duration_secs: int = 42, has_audio: bool = True) -> FakeConversation:
        """The call ended: the conversation becomes `done` with a transcript and analysis (and audio)."""
        with self._lock:
            conversation = self._by_id[conversation_id]
            conversation.status = "done"
            conversation.call_duration_secs = duration_secs
            conversation.has_audio = has_audio
            return conversation

    # --- webhook events of the data set ------------------------------------------------------------------------

    def transcription_event(self, conversation_id: str) -> dict[str, Any]:
        detail = self.get(conversation_id).detail()
        return {"type": "post_call_transcription", "event_timestamp": int(time.time()), "data": detail}

    def audio_event(self, conversation_id: str) -> dict[str, Any]:
        conversation = self.get(conversation_id)
        audio = base64.b64encode(conversation.audio(self.audio_bytes)).decode()
        data = {"agent_id": conversation.agent_id, "conversation_id": conversation_id, "full_audio": audio}
        return {"type": "post_call_audio", "event_timestamp": int(time.time()), "data": data}

    def failure_event(self, conversation_id: str) -> dict[str, Any]:
        conversation = self.get(conversation_id)
        data = {
            "agent_id": conversation.agent_id,
            "conversation_id": conversation_id,
            "failure_reason": "no-answer",
            "metadata": {"type": "sip", "body": {"sip_status_code": 480, "error_reason": "no answer"}},
        }
        return {"type": "call_initiation_failure", "event_timestamp": int(time.time()), "data": data}

    def events(self, *, audio: bool = False) -> list[dict[str, Any]]:
        """The webhooks ElevenLabs would send for every final conversation, oldest call first."""
        out: list[dict[str, Any]] = []
        for conversation in reversed(self.all()):
            cid = conversation.conversation_id
            if conversation.status == "done":
                out.append(self.transcription_event(cid))
                if audio and conversation.has_audio:
                    out.append(self.audio_event(cid))
            elif conversation.status == "failed":
                out.append(self.failure_event(cid))
        return out

    # --- faults and the call log --------------------------------------------------------------------------------

    def throttle(self, times: int, retry_after: str = "1", kinds: Iterable[str] | None = None) -> None:
        """The next `times` requests (of `kinds`, default any) answer 429 with this `Retry-After`."""
        with self._lock:
            self._throttles.append(_Throttle(times, retry_after, frozenset(kinds) if kinds else None))

    def fail(self, times: int | None, status: int = 500, kinds: Iterable[str] | None = None) -> None:
        """The next `times` requests (of `kinds`, default any; None: all until `clear_faults()`) answer `status`."""
        with self._lock:
            self._failures.append(_Fault(times, _kinds(kinds), status=status))

    def truncate(self, times: int | None, kinds: Iterable[str] | None = None, *, abort: bool = False) -> None:
        """The next `times` answers that would be 200 (of `kinds`) lose the second half of their body.

        By default the headers match what is sent, so the client reads a whole 200 whose JSON simply ends
        mid-way; with `abort` the headers promise the whole body and the connection drops halfway through it.
        """
        with self._lock:
            self._truncations.append(_Fault(times, _kinds(kinds), abort=abort))

    def answer_with(self, body: Any, times: int | None, kinds: Iterable[str] | None = None) -> None:
        """The next `times` answers that would be 200 (of `kinds`) are 200 with `body` as JSON instead (bytes are
        sent as they are): an API that answers, but not with what it documents."""
        with self._lock:
            self._replacements.append(_Fault(times, _kinds(kinds), body=body))

    def stall(self, seconds: float, times: int | None, kinds: Iterable[str] | None = None) -> None:
        """The next `times` requests (of `kinds`) wait `seconds` before they are answered: a client timeout."""
        with self._lock:
            self._stalls.append(_Fault(times, _kinds(kinds), seconds=seconds))

    def clear_faults(self) -> None:
        """Every on-demand fault off: throttles, failures, truncations, replacements, stalls, odd cursors."""
        with self._lock:
            self._throttles.clear()
            self._failures.clear()
            self._truncations.clear()
            self._replacements.clear()
            self._stalls.clear()
            self.repeat_cursors = False
            self.endless_cursors = False
            self._unstall.set()
            self._unstall = threading.Event()

    def pause(self) -> None:
        """Hold every request (they wait, unanswered) until `resume()`: a run that stays in flight on demand."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def calls_to(self, kind: str) -> list[Call]:
        with self._lock:
            return [call for call in self.calls if call.kind == kind]

    def reset_calls(self) -> None:
        with self._lock:
            self.calls.clear()

    # --- serving ------------------------------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/convai/agents", self._endpoint("agents", self._agents_page)),
                Route("/v1/convai/conversations", self._endpoint("list", self._conversations_page)),
                Route(
                    "/v1/convai/conversations/{conversation_id}",
                    self._endpoint("detail", self._detail),
                    methods=["GET"],
                ),
                Route(
                    "/v1/convai/conversations/{conversation_id}",
                    self._endpoint("delete", self._delete),
                    methods=["DELETE"],
                ),
                Route("/v1/convai/conversations/{conversation_id}/audio", self._endpoint("audio", self._audio)),
                Route("/v1/convai/conversation/token", self._endpoint("token", self._token)),
                Route("/v1/convai/conversation/get-signed-url", self._endpoint("signed_url", self._signed_url)),
                Route("/v1/workspace/webhooks", self._endpoint("webhooks", self._webhooks)),
                Route("/v1/convai/settings", self._endpoint("settings", self._settings)),
            ]
        )

    @contextmanager
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Serve on a real port (a free one by default) in a background thread; yields the base URL."""
        import socket

        import uvicorn

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(self.app(), log_level="warning", access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the fake platform did not start")
            time.sleep(0.01)
        try:
            yield f"http://{host}:{bound_port}"
        finally:
            self.clear_faults()  # stalled answers end now rather than hold up the shutdown
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()

    def _endpoint(self, kind: str, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            arrived = time.monotonic()
            with self._lock:
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                if not self._running.is_set():  # held until `resume()`
                    await anyio.to_thread.run_sync(self._running.wait)
                response = self._refusal(kind, request)
                if response is None:
                    if self.latency:
                        await anyio.sleep(self.latency)
                    await self._stall(kind)
                    response = self._truncated(kind, handler(request))
            finally:
                with self._lock:
                    self.in_flight -= 1
            if self.log_calls:
                call = Call(
                    at=arrived,
                    kind=kind,
                    path=request.url.path,
                    query=dict(request.query_params),
                    status=response.status_code,
                    request_headers=dict(request.headers),
                    response_headers=dict(response.headers),
                )
                with self._lock:
                    self.calls.append(call)
            return response

        return endpoint

    def _refusal(self, kind: str, request: Request) -> Response | None:
        given = request.headers.get("xi-api-key", "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            return _error(401, "invalid_api_key", "Invalid API key")
        with self._lock:
            for throttle in self._throttles:
                if throttle.remaining > 0 and (throttle.kinds is None or kind in throttle.kinds):
                    throttle.remaining -= 1
                    response = _error(429, "too_many_concurrent_requests", "Too many requests")
                    response.headers["retry-after"] = throttle.retry_after
                    return response
            cid = request.path_params.get("conversation_id")
            if cid is not None and cid in self.failing_ids:
                return _error(500, "internal_error", "An internal error occurred")
            if kind == "audio" and cid in self.audio_faults:
                status = self.audio_faults[cid]
                return _error(status, "audio_unavailable", f"Injected HTTP {status} for this conversation's audio")
            for failure in self._failures:
                if failure.take(kind):
                    return _error(failure.status, "internal_error", f"Injected HTTP {failure.status}")
        return None

    async def _stall(self, kind: str) -> None:
        """Wait out the stalls that apply, unless `clear_faults()` (or the server stopping) ends them first, so
        that a test does not wait for answers its client gave up on long ago."""
        with self._lock:
            seconds = sum(stall.seconds for stall in self._stalls if stall.take(kind))
            unstall = self._unstall
        if seconds:
            await anyio.to_thread.run_sync(unstall.wait, seconds, abandon_on_cancel=True)

    def _truncated(self, kind: str, response: Response) -> Response:
        if response.status_code != 200:
            return response
        with self._lock:
            replacement = next((r for r in self._replacements if r.take(kind)), None)
            fault = None if replacement else next((t for t in self._truncations if t.take(kind)), None)
        if replacement is not None:
            body = replacement.body
            if isinstance(body, Response):
                return body
            return Response(body, media_type="application/json") if isinstance(body, bytes) else _json(body)
        if fault is None:
            return response
        if fault.abort:
            return _CutOff(response.body, media_type=response.media_type)
        return Response(response.body[: len(response.body) // 2], media_type=response.media_type)

    # --- handlers (run under no lock of the caller; each takes the lock for its read) ---------------------------

    def _agents_page(self, request: Request) -> Response:
        size = _page_size(request)
        if isinstance(size, Response):
            return size
        with self._lock:
            agents = list(self._agents)
        offset = int(request.query_params.get("cursor") or 0)
        page = agents[offset : offset + size]
        more = offset + size < len(agents)
        body = {
            "agents": [_agent_summary(agent_id) for agent_id in page],
            "next_cursor": str(offset + size) if more else None,
            "has_more": more,
        }
        return JSONResponse(body)

    def _conversations_page(self, request: Request) -> Response:
        size = _page_size(request)
        if isinstance(size, Response):
            return size
        query = request.query_params
        mode = query.get("summary_mode", "exclude")
        if mode not in SUMMARY_MODES:
            return _error(422, "invalid_parameters", f"summary_mode must be one of {', '.join(SUMMARY_MODES)}")
        try:
            after = int(query["call_start_after_unix"]) if "call_start_after_unix" in query else None
            before = int(query["call_start_before_unix"]) if "call_start_before_unix" in query else None
            cursor = self._read_cursor(self._cursor(query.get("cursor")))
        except ValueError:
            return _error(422, "invalid_parameters", "bad call_start_*_unix or cursor")
        with self._lock:
            keys = self._order.get(query.get("agent_id"), []) if "agent_id" in query else self._order[None]
            position = 0 if before is None else bisect.bisect_left(keys, (-before + 1, ""))
            if cursor is not None:
                position = max(position, bisect.bisect_right(keys, cursor))
            page: list[dict[str, Any]] = []
            last: tuple[int, str] | None = None
            more = False
            for key in keys[position:]:
                if after is not None and -key[0] <= after:
                    break
                if len(page) == size:
                    more = True
                    break
                page.append(self._summary(key[1], with_summary=mode == "include"))
                last = key
            next_cursor = self._write_cursor(last) if more and last is not None else None
        if self.endless_cursors:
            next_cursor, more = f"{ENDLESS_CURSOR}{secrets.token_hex(8)}", True
        if self.repeat_cursors and cursor is not None:
            # A broken API: the page for a cursor points back to that same cursor, so paging never ends.
            next_cursor, more = query["cursor"], True
        return _json({"conversations": page, "next_cursor": next_cursor, "has_more": more})

    def _summary(self, conversation_id: str, *, with_summary: bool) -> dict[str, Any]:
        summary = self._by_id[conversation_id].summary()
        if not with_summary:  # as the API lists by default (summary_mode=exclude)
            del summary["transcript_summary"]
        if conversation_id in self.summaries_without_start:
            del summary["start_time_unix_secs"]
        return summary

    def _read_cursor(self, text: str | None) -> tuple[int, str] | None:
        if not text:
            return None
        with self._lock:
            position = self._cursors.get(text)
        if position is None:
            raise ValueError("unknown cursor")
        return position

    def _write_cursor(self, key: tuple[int, str]) -> str:
        """An opaque token, as ElevenLabs' cursors are: nothing in it says where it points."""
        token = secrets.token_urlsafe(18)
        self._cursors[token] = key
        return token

    def _cursor(self, text: str | None) -> str | None:
        """An endless listing's cursors all lead back to its first page."""
        return None if self.endless_cursors and text and text.startswith(ENDLESS_CURSOR) else text

    def _detail(self, request: Request) -> Response:
        with self._lock:
            conversation = self._by_id.get(request.path_params["conversation_id"])
            detail = conversation.detail() if conversation is not None else None
        if detail is None:
            return _error(404, "conversation_not_found", "Conversation not found")
        return _json(detail)

    def _delete(self, request: Request) -> Response:
        try:
            self.remove(request.path_params["conversation_id"])
        except KeyError:
            return _error(404, "conversation_not_found", "Conversation not found")
        return _json({})

    def _webhooks(self, request: Request) -> Response:
        with self._lock:
            return _json({"webhooks": [webhook.answer() for webhook in self.webhooks]})

    def _settings(self, request: Request) -> Response:
        with self._lock:
            hooks: dict[str, Any] = {
                "post_call_webhook_id": self.post_call_webhook_id,
                "transcript_format": self.transcript_format,
                "send_audio": False,
            }
            if self.webhook_events is not None:
                hooks["events"] = list(self.webhook_events)
        body = {
            "conversation_initiation_client_data_webhook": None,
            "webhooks": hooks,
            "can_use_mcp_servers": False,
            "rag_retention_period_days": 10,
        }
        return _json(body)

    def _audio(self, request: Request) -> Response:
        with self._lock:
            conversation = self._by_id.get(request.path_params["conversation_id"])
        if conversation is None or not (conversation.has_audio and conversation.status == "done"):
            return _error(404, "audio_not_found", "No audio for this conversation")
        return Response(conversation.audio(self.audio_bytes), media_type="audio/mpeg")

    def _token(self, request: Request) -> Response:
        query = request.query_params
        agent_id = query.get("agent_id")
        if not agent_id:
            return _error(422, "invalid_parameters", "agent_id is required")
        if agent_id not in self.agent_ids:
            return _error(404, "agent_not_found", f"Agent {agent_id} not found")
        name = query.get("participant_name")
        cid = self.mint(agent_id, participant_name=name, branch_id=query.get("branch_id"))
        return _json({"token": livekit_token(cid, name)})

    def _signed_url(self, request: Request) -> Response:
        query = request.query_params
        agent_id = query.get("agent_id")
        if not agent_id:
            return _error(422, "invalid_parameters", "agent_id is required")
        if agent_id not in self.agent_ids:
            return _error(404, "agent_not_found", f"Agent {agent_id} not found")
        cid = self.mint(agent_id, branch_id=query.get("branch_id"))
        signature = secrets.token_urlsafe(24)
        url = f"wss://api.elevenlabs.io/v1/convai/conversation?agent_id={agent_id}&conversation_signature={signature}"
        body: dict[str, Any] = {"signed_url": url}
        if query.get("include_conversation_id", "").lower() == "true":
            body["conversation_id"] = cid
        return _json(body)


def livekit_token(conversation_id: str, participant_name: str | None) -> str:
    """A LiveKit-style access token (HS256 JWT) whose room names the conversation, as ElevenLabs' does."""
    now = int(time.time())
    identity = participant_name or f"user_{secrets.token_hex(6)}"
    claims = {
        "sub": identity,
        "name": participant_name or identity,
        "iss": "APIfakeLiveKitKey",
        "nbf": now,
        "exp": now + TOKEN_TTL_SECONDS,
        "video": {
            "room": f"room_{conversation_id}_{secrets.token_hex(4)}",
            "roomJoin": True,
            "canPublish": True,
            "canSubscribe": True,
            "canPublishData": True,
        },
    }
    header = _b64url(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    payload = _b64url(orjson.dumps(claims))
    signature = hmac.new(JWT_KEY, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def _kinds(kinds: Iterable[str] | None) -> frozenset[str] | None:
    return frozenset(kinds) if kinds else None


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _page_size(request: Request) -> int | Response:
    text = request.query_params.get("page_size")
    if text is None:
        return DEFAULT_PAGE_SIZE
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE_SIZE:
        return JSONResponse(
            {"detail": [{"loc": ["query", "page_size"], "msg": f"must be 1..{MAX_PAGE_SIZE}", "type": "value_error"}]},
            status_code=422,
        )
    return int(text)


def _agent_summary(agent_id: str) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "name": f"Agent {agent_id}",
        "tags": [],
        "created_at_unix_secs": 1_700_000_000,
        "access_info": {"is_creator": True, "creator_name": "Fake", "creator_email": "f@example.com", "role": "admin"},
    }


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"detail": {"status": code, "message": message}}, status_code=status)
