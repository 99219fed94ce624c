"""`postcall erase` behind the argument parsing: choose the conversations, erase (or count), report, exit status.

Exit statuses: 0 erased (or counted); 1 the database is unavailable, or ElevenLabs refused a deletion (`--upstream`:
each refusal is reported on standard error, and everything is still erased here); 2 usage or configuration errors
(the CLI checks the arguments before calling here; a database not migrated is checked here).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TextIO

import anyio
from sqlalchemy.engine import Engine

from service.config import Settings
from service.elevenlabs import ElevenLabsClient
from service.erase import erasure
from service.erase.upstream import UpstreamReport, delete_at_elevenlabs
from service.storage.audio import BlobStore
from service.storage.db import StoreUnavailable, create_engine
from service.storage.migrations import unmigrated

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def execute(
    settings: Settings,
    *,
    conversation_ids: Sequence[str],
    user_id: str | None,
    upstream: bool,
    dry_run: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Erase the named conversations, or every conversation of `user_id`; returns the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per deletion would drown the report
    engine = create_engine(settings.database_url)
    found = UpstreamReport()
    try:
        behind = unmigrated(engine)
        if behind is not None:
            print(f"postcall: the database is not migrated ({behind}): run `postcall migrate` first", file=err)
            return EXIT_USAGE
        if user_id is not None:
            plan = erasure.of_user(engine, user_id)
        else:
            plan = erasure.named(conversation_ids, tombstone_unstored=True)
        if dry_run:
            out.write(describe(erasure.count(engine, plan), plan, None, upstream, dry_run=True) + "\n")
            return EXIT_OK
        report = anyio.run(_erase, settings, engine, plan, found if upstream else None, err)
    except StoreUnavailable as exc:
        print(f"postcall: database unavailable: {exc}", file=err)
        return EXIT_FAILED
    finally:
        engine.dispose()
    out.write(describe(report, plan, found if upstream else None, upstream, dry_run=False) + "\n")
    return EXIT_FAILED if found.failed else EXIT_OK


async def _erase(
    settings: Settings, engine: Engine, plan: erasure.Plan, upstream: UpstreamReport | None, err: TextIO
) -> erasure.EraseReport:
    blobs = BlobStore(settings.data_dir)
    if upstream is None:
        return await erasure.erase(engine, blobs, plan, erasure.CLI_ACTOR)
    assert settings.elevenlabs_api_key is not None  # the CLI requires it with --upstream
    api_key = settings.elevenlabs_api_key.get_secret_value()
    report = upstream

    def failed(conversation_id: str, why: str) -> None:
        print(f"postcall: ElevenLabs did not delete {conversation_id}: {why}", file=err)

    async with ElevenLabsClient.open(settings.elevenlabs_base_url, api_key) as client:

        async def delete(ids: Sequence[str]) -> None:
            await delete_at_elevenlabs(client, ids, report, failed)

        return await erasure.erase(engine, blobs, plan, erasure.CLI_ACTOR, upstream=delete)


def describe(
    report: erasure.EraseReport,
    plan: erasure.Plan,
    upstream: UpstreamReport | None,
    asked_upstream: bool,
    *,
    dry_run: bool,
) -> str:
    """What was (or, with --dry-run, would be) erased, for the operator; names no conversation and no user."""
    chosen = f"of {len(plan.ids)} named" if plan.selector is erasure.Selector.CONVERSATION else "of the user"
    verb = "would erase" if dry_run else "erased"
    audio = f"{report.audio_files} audio files ({report.audio_bytes:,} bytes)"
    line = (
        f"{verb} {report.conversations} conversations {chosen}, with {audio} and "
        f"{report.webhook_events} archived webhook bodies; {report.tombstones} new tombstones"
    )
    if report.missing_files:
        line += f"; {report.missing_files} audio files were already missing"
    lines = [line]
    if dry_run:
        lines.append("dry run: nothing was changed")
        if asked_upstream:
            lines.append(f"--upstream would ask ElevenLabs to delete {len(plan.ids)} conversations")
    elif upstream is not None:
        lines.append(
            f"ElevenLabs: {upstream.deleted} deleted, {upstream.absent} already gone, {len(upstream.failed)} failed"
        )
    return "\n".join(lines)
