"""What `postcall doctor` looks at: the database, the data dir, ElevenLabs. Each probe returns its lines and never
raises for what it is there to find (an unreachable database, a read-only disk, a refused key)."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

from service.config import Settings
from service.doctor.checks import WEBHOOK, Line, fail, ok, webhook_lines
from service.elevenlabs import ApiError, ElevenLabsClient, ElevenLabsError, RetryPolicy, Unreachable
from service.forward.configured import build_sinks
from service.reconcile.upstream import NoPostCallWebhook, post_call_webhook
from service.storage.db import StoreUnavailable, create_engine
from service.storage.migrations import unmigrated

# A check should answer within seconds: a couple of quick retries, and a bound on each call.
RETRIES = RetryPolicy(attempts=3, wait_initial=0.5, wait_max=2.0, retry_after_max=5.0)
DEADLINE_SECONDS = 30.0
PROBE = b"postcall doctor probe\n"


def database(settings: Settings) -> Line:
    engine = create_engine(settings.database_url)
    shown = engine.url.render_as_string(hide_password=True)
    try:
        behind = unmigrated(engine)
    except StoreUnavailable as exc:
        return fail("database", f"cannot reach {shown}: {exc}; check POSTCALL_DATABASE_URL and that it is up")
    finally:
        engine.dispose()
    if behind is not None:
        return fail("database", f"{shown} is not migrated ({behind}): run `postcall migrate`")
    return ok("database", f"{shown}, at the newest migration")


def data_dir(path: Path) -> Line:
    """Write, sync, read back and delete a probe file where audio goes."""
    probe = path / f".postcall-doctor-{secrets.token_hex(6)}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, PROBE)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        if probe.read_bytes() != PROBE:
            return fail("data dir", f"{path}: a probe file read back different: check the disk")
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):  # nothing of the probe left behind, where it got that far
            probe.unlink(missing_ok=True)
        return fail(
            "data dir",
            f"cannot write to {path}: {exc.strerror or exc}; make it writable by the user postcall runs as, or set "
            "POSTCALL_DATA_DIR",
        )
    return ok("data dir", f"{path} (a probe file written, read back and deleted)")


async def elevenlabs(settings: Settings) -> list[Line]:
    """The API key (`GET /v1/convai/agents`), then the workspace's post-call webhook."""
    if settings.elevenlabs_api_key is None:
        missing = "POSTCALL_ELEVENLABS_API_KEY is not set: set it to an ElevenLabs API key of the workspace"
        return [fail("API key", missing), fail(WEBHOOK, "not checked: it needs the API key")]
    api_key = settings.elevenlabs_api_key.get_secret_value()
    base_url = settings.elevenlabs_base_url
    async with ElevenLabsClient.open(base_url, api_key, retries=RETRIES, deadline=DEADLINE_SECONDS) as client:
        try:
            async for _ in client.agents():
                break  # one page says the key works
        except ElevenLabsError as exc:
            return [_key_refused(exc, base_url), fail(WEBHOOK, "not checked: it needs a working API key")]
        lines = [ok("API key", f"ElevenLabs at {base_url} accepts it")]
        try:
            found: tuple[Any, Any] = (await client.convai_settings(), await client.workspace_webhooks())
        except ElevenLabsError as exc:
            return [*lines, fail(WEBHOOK, f"cannot read the workspace's webhooks ({exc}): {_read_hint(exc)}")]
    try:
        webhook = post_call_webhook(*found)
    except NoPostCallWebhook as exc:
        advice = "choose one in the Agents Platform settings (post-call webhook), posting to its /webhooks/elevenlabs"
        return [*lines, fail(WEBHOOK, f"{exc}; {advice}")]
    return [*lines, *webhook_lines(webhook, settings.public_url, int(time.time()))]


async def forwarding(settings: Settings) -> list[Line]:
    """Each configured forwarding sink reached now (nothing sent); no line when none is configured."""
    lines = []
    for sink in build_sinks(settings):
        try:
            problem = await sink.reachable()
        finally:
            await sink.aclose()
        check = f"forwarding to {sink.name}"
        if problem is None:
            lines.append(ok(check, "reachable (a connection opened; nothing sent)"))
        else:
            hint = "check POSTCALL_FORWARD_URLS / POSTCALL_FORWARD_NATS_URL and that it is up"
            lines.append(fail(check, f"cannot reach it ({problem}): {hint}; events wait for it meanwhile"))
    return lines


def _key_refused(exc: ElevenLabsError, base_url: str) -> Line:
    if isinstance(exc, ApiError) and exc.status in (401, 403):
        return fail("API key", f"ElevenLabs refused it ({exc}): check POSTCALL_ELEVENLABS_API_KEY")
    if isinstance(exc, Unreachable):
        return fail(
            "API key",
            f"cannot reach ElevenLabs at {base_url} ({exc}): check POSTCALL_ELEVENLABS_BASE_URL and the network",
        )
    return fail("API key", f"ElevenLabs at {base_url} did not answer as expected ({exc}): try again later")


def _read_hint(exc: ElevenLabsError) -> str:
    if isinstance(exc, ApiError) and exc.status in (401, 403):
        return "the key needs access to the workspace's settings (a workspace admin's key, or that permission)"
    return "try again later"
