"""`postcall simulate`: trying postcall end to end without an ElevenLabs account, as the README shows it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Engine

from service.config import Settings
from service.web.app import create_app
from tests.support import webhooks as wh
from tests.support.live import free_port, live_server
from tests.support.process import ROOT
from tests.support.reconcile import reconcile, rows

SIM_KEY = "sim-api-key"


@contextmanager
def simulate(*args: str) -> Iterator[tuple[str, list[str]]]:
    """Run `postcall simulate` until it says it is serving; yields its API URL and what it printed."""
    port = free_port()
    command = [sys.executable, "-m", "service", "simulate", "--port", str(port), *args]
    env = {**os.environ, "POSTCALL_WEBHOOK_SECRETS": wh.SECRET}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    said: list[str] = []
    try:
        for line in proc.stderr:
            said.append(line.strip())
            if "serving until interrupted" in line:
                break
        assert proc.poll() is None, "\n".join(said)
        yield f"http://127.0.0.1:{port}", said
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_simulated_webhooks_with_drops_then_one_reconcile_make_the_store_complete(
    settings: Settings, engine: Engine
) -> None:
    with live_server(create_app(settings, engine=engine)) as postcall:
        webhook_url = f"{postcall}/webhooks/elevenlabs"
        with simulate("--conversations", "40", "--drop", "0.3", "--webhook-url", webhook_url) as (fake_url, said):
            sent = next(line for line in said if line.startswith("webhooks:"))
            dropped = int(re.search(r"(\d+) dropped", sent).group(1))  # type: ignore[union-attr]
            stored_by_webhooks = {row["conversation_id"] for row in rows(engine, "conversation")}
            run = reconcile(settings, fake_url, SIM_KEY, "--json")

    assert f"fake ElevenLabs API on {fake_url}: 40 conversations" in said[0]
    assert dropped > 0
    assert len(stored_by_webhooks) <= 40 - dropped
    assert run.exit_code == 0, run.stderr
    assert run.json["listed"] == 40
    assert run.json["new"] == 40 - len(stored_by_webhooks)
    records = rows(engine, "conversation")
    assert len(records) == 40
    assert all(record["complete"] for record in records if record["status"] in ("done", "failed"))
    done = [record for record in records if record["status"] == "done"]
    assert done and all(record["transcript"] for record in done)


def test_the_simulated_workspace_posts_to_the_webhook_url_so_doctor_can_check_a_local_setup(
    settings: Settings, engine: Engine
) -> None:
    with live_server(create_app(settings, engine=engine)) as postcall:
        webhook_url = f"{postcall}/webhooks/elevenlabs"
        with simulate("--conversations", "2", "--drop", "1", "--webhook-url", webhook_url) as (fake_url, said):
            env = {
                "POSTCALL_DATABASE_URL": settings.database_url,
                "POSTCALL_DATA_DIR": str(settings.data_dir),
                "POSTCALL_ELEVENLABS_BASE_URL": fake_url,
                "POSTCALL_ELEVENLABS_API_KEY": SIM_KEY,
                "POSTCALL_PUBLIC_URL": postcall,
            }
            doctor = subprocess.run(
                [sys.executable, "-m", "service", "doctor"], cwd=ROOT, env={**os.environ, **env}, capture_output=True
            )

    assert any(line.endswith(f"POSTCALL_PUBLIC_URL={postcall} postcall doctor") for line in said)
    assert doctor.returncode == 0, doctor.stdout.decode()
    assert f"✓ post-call webhook: {webhook_url} (HMAC, enabled)" in doctor.stdout.decode()
