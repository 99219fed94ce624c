"""`postcall reconcile` behind the argument parsing: build the parts, run, report, choose the exit status.

Exit statuses (README, the reconciler): 0 everything stored; 1 anything failed after retries (or the database is down);
2 usage or configuration errors (the CLI checks the arguments before calling here; a database not migrated is
checked here); 3 another run holds the lease.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

import anyio
import orjson
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from service.config import Settings
from service.elevenlabs import ElevenLabsClient
from service.reconcile.ledger import Counts, LeaseHeld, Report
from service.reconcile.reconciler import Options, Reconciler
from service.storage.db import StoreUnavailable, create_engine
from service.storage.migrations import unmigrated
from service.storage.stores import open_audio_store

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LEASE_HELD = 3


def execute(settings: Settings, options: Options, *, as_json: bool, out: TextIO | None = None) -> int:
    """Run once and print the summary (or one JSON object); returns the exit status."""
    assert settings.elevenlabs_api_key is not None  # the CLI requires it
    api_key = settings.elevenlabs_api_key.get_secret_value()
    agents = options.agents or settings.agent_ids
    options = Options(**{**options.__dict__, "agents": tuple(agents)})
    # One line per request would drown the summary; the client logs its retries itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    engine = create_engine(settings.database_url)

    async def go(on_progress: Callable[[Counts], None] | None) -> Report:
        async with ElevenLabsClient.open(settings.elevenlabs_base_url, api_key) as client:
            reconciler = Reconciler(engine, client, open_audio_store(settings), on_progress=on_progress)
            return await reconciler.run(options)

    try:
        behind = unmigrated(engine)
        if behind is not None:
            print(f"postcall: the database is not migrated ({behind}): run `postcall migrate` first", file=sys.stderr)
            return EXIT_USAGE
        with _progress(enabled=not as_json) as on_progress:
            report = anyio.run(go, on_progress)
    except LeaseHeld as exc:
        print(f"postcall: {exc}", file=sys.stderr)
        return EXIT_LEASE_HELD
    except StoreUnavailable as exc:
        print(f"postcall: database unavailable: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        engine.dispose()
    out = sys.stdout if out is None else out
    if as_json:
        out.write(orjson.dumps(report.as_dict()).decode() + "\n")
    else:
        out.write(describe(report) + "\n")
    return EXIT_OK if report.ok else EXIT_FAILED


def describe(report: Report) -> str:
    head = "dry run, nothing written: " if report.dry_run else ""
    scope = f"{len(report.agents)} agent(s)" if report.agents else "the whole workspace"
    line = f"{head}{scope}: {_figures(report.counts, ', ')}"
    if report.dry_run:
        line += f"; a real run would fetch {report.details_needed} detail(s)"
    lines = [line, *(f"  warning: {warning}" for warning in report.warnings)]
    lines += [f"  failed: {error}" for error in report.errors]
    if not report.ok:
        lines.append("some conversations were not stored; the checkpoint stays before them and the next run retries")
    return "\n".join(lines)


def _figures(counts: Counts, separator: str) -> str:
    """`listed 3, new 1, …, details fetched 2, …`: every count, named as in the `--json` object."""
    return separator.join(f"{name.replace('_', ' ')} {value}" for name, value in counts.as_dict().items())


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[Counts], None] | None]:
    """A live line on standard error while the run goes, only when that is a terminal."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("reconciling")

        def show(counts: Counts) -> None:
            progress.update(task, description=_figures(counts, " · "))

        yield show
