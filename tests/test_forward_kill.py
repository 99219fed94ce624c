"""`kill -9` of `postcall serve` while events are in flight to a slow endpoint: after a restart every event is
delivered (at least once), and neither the forward secret nor the endpoint's credentials reach the log."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from tests.support import webhooks
from tests.support.forwarding import FORWARD_SECRET, Receiver, receiving, table_rows, wait_until
from tests.support.process import serve_process

pytestmark = pytest.mark.slow


def test_every_event_is_delivered_after_kill_9_with_sends_in_flight(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    receiver = Receiver(delay=2.0)  # slow enough that the kill lands mid-send
    log = tmp_path / "serve.log"
    ids = [f"conv_kill{n}" for n in range(8)]
    with receiving(receiver) as hook:
        env = {
            "POSTCALL_DATABASE_URL": database_url,
            "POSTCALL_WEBHOOK_SECRETS": webhooks.SECRET,
            "POSTCALL_DATA_DIR": str(tmp_path / "data"),
            "POSTCALL_FORWARD_URLS": hook + "?key=do-not-log-me",
            "POSTCALL_FORWARD_SECRET": FORWARD_SECRET,
        }
        with serve_process(env, "--no-migrate", log=log) as (base, proc):
            for conversation_id in ids:
                body = webhooks.encode(webhooks.transcription(conversation_id))
                answer = httpx.post(f"{base}/webhooks/elevenlabs", content=body, headers=webhooks.signed_headers(body))
                assert answer.status_code == 200
            wait_until(lambda: sum(receiver.in_flight.values()) > 0, what="sends in flight")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert len(table_rows(engine, "SELECT id FROM forward_delivery WHERE status = 'delivered'")) < len(ids)
        with serve_process(env, "--no-migrate", log=log):
            # Claims of the killed process run out (their lease), then the new one sends them.
            wait_until(
                lambda: (
                    len(table_rows(engine, "SELECT id FROM forward_delivery WHERE status = 'delivered'")) == len(ids)
                ),
                timeout=90,
                what="every event delivered after the restart",
            )
    assert set(receiver.keys()) == {(conversation_id, 1) for conversation_id in ids}
    text = log.read_text()
    assert "forwarding to" in text  # the log is the server's, and it says what it forwards to
    assert FORWARD_SECRET not in text and FORWARD_SECRET[6:] not in text and "do-not-log-me" not in text
