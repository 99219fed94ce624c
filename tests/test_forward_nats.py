"""Forwarding to NATS JetStream: a real nats-server with JetStream at 127.0.0.1:4222, a stream per test."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy.engine import Engine

from service.forward.dispatcher import Dispatcher
from service.forward.nats_sink import NatsSink, subject
from service.forward.sinks import Outgoing
from tests.support import records
from tests.support.forwarding import dispatching, table_rows, wait_until

NATS_URL = "nats://127.0.0.1:4222"
pytestmark = pytest.mark.nats


@pytest.fixture
def stream() -> Iterator[str]:
    name = f"POSTCALL_TEST_{uuid.uuid4().hex[:10].upper()}"
    yield name

    async def delete() -> None:
        client = await nats.connect(NATS_URL)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await client.jetstream().delete_stream(name)
        await client.close()

    asyncio.run(delete())


def stored_messages(stream: str) -> list[tuple[str, dict[str, Any], str]]:
    """(subject, event, Nats-Msg-Id) of every message the stream holds."""

    async def read() -> list[tuple[str, dict[str, Any], str]]:
        import orjson

        client = await nats.connect(NATS_URL)
        js = client.jetstream()
        info = await js.stream_info(stream)
        found: list[tuple[str, dict[str, Any], str]] = []
        if info.state.messages:
            sub = await js.pull_subscribe(
                "postcall.>", stream=stream, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
            )
            while len(found) < info.state.messages:
                for message in await sub.fetch(100, timeout=5):
                    headers = message.headers or {}
                    found.append((message.subject, orjson.loads(message.data), headers.get("Nats-Msg-Id", "")))
                    await message.ack()
        await client.close()
        return found

    return asyncio.run(read())


def test_subjects_are_the_type_and_a_safe_agent_token() -> None:
    assert subject("conversation.created", "agent_7401k") == "postcall.conversation.created.agent_7401k"
    assert subject("conversation.updated", None) == "postcall.conversation.updated.none"
    assert subject("conversation.deleted", "a.b *>c") == "postcall.conversation.deleted.a_b___c"


def test_jetstream_gets_each_event_once_by_id(engine: Engine, stream: str, tmp_path: Path) -> None:
    ids = [f"conv_js{n}" for n in range(5)]
    sink = NatsSink(NATS_URL, stream)
    with dispatching(engine, [sink]):
        for conversation_id in ids:
            records.store(engine, [records.session(conversation_id, agent_id="agent.x")], now=datetime.now(UTC))
            records.store(engine, [records.detail(conversation_id, agent_id="agent.x")], now=datetime.now(UTC))
        wait_until(lambda: _delivered(engine) == 10, what="10 acks")
    messages = stored_messages(stream)  # the stream was created by the sink
    assert len(messages) == 10
    assert all(event["id"] == msg_id for _, event, msg_id in messages)
    assert {subj for subj, _, _ in messages} == {
        "postcall.conversation.created.agent_x",
        "postcall.conversation.updated.agent_x",
    }
    order: dict[str, list[int]] = {}
    for _, event, _ in messages:
        order.setdefault(event["data"]["conversation_id"], []).append(event["data"]["revision"])
    assert order == {conversation_id: [1, 2] for conversation_id in ids}

    # The same event published again (an ack lost on its way back, then a retry) is stored once: JetStream
    # dedupes by Nats-Msg-Id.
    row = table_rows(engine, "SELECT id, event_id, type, agent_id, body, committed_at FROM forward_event LIMIT 1")[0]
    again = Outgoing(0, row[1], row[2], row[3], row[4], row[5])

    async def resend() -> bool:
        retry = NatsSink(NATS_URL, stream)
        outcome = await retry.send(again)
        await retry.aclose()
        return outcome.delivered

    assert asyncio.run(resend())
    assert len(stored_messages(stream)) == 10


def test_a_nats_server_that_cannot_be_reached_is_a_failed_attempt(engine: Engine, stream: str) -> None:
    records.store(engine, [records.session("conv_nowhere")], now=datetime.now(UTC))
    sink = NatsSink("nats://127.0.0.1:1", stream)  # nothing listens on port 1
    with dispatching(engine, [sink]):
        wait_until(lambda: bool(table_rows(engine, "SELECT id FROM forward_attempt")), what="an attempt")
    ((outcome, error),) = table_rows(engine, "SELECT outcome, error FROM forward_attempt")[:1]
    assert outcome == "failed" and error
    assert Dispatcher is not None


def _delivered(engine: Engine) -> int:
    return len(table_rows(engine, "SELECT id FROM forward_delivery WHERE status = 'delivered'"))
