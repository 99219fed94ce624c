"""`postcall export` behind the argument parsing: the selection, the destination, the progress bar, the run.

Standard output carries the data and nothing else when it is the destination (`-` or no `--output`): the progress
bar, the summary and the logs go to standard error. A file is written under a temporary name next to it and renamed
into place only when the export has finished, so a failed or interrupted export leaves no partial file (and an
existing file stays as it was). The file is readable by its owner only: it holds callers' personal data.

Exit statuses: 0 written; 1 the database was unavailable or the output could not be written; 2 a bad value (the
CLI checks those before anything is read or written).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy.engine import Engine

from service.export import query
from service.export.formats import Format, open_writer
from service.export.query import Selection
from service.reconcile.windows import WindowError, parse_instant
from service.storage.db import create_engine


class ExportUsageError(ValueError):
    """A value the export cannot use; `str()` is the one line the user sees."""


def parse_selection(since: str | None, until: str | None, agents: Sequence[str], now: int) -> Selection:
    """`--since`/`--until` in the reconciler's forms (7d, ISO-8601, unix seconds) and `--agent` ids."""
    bounds: dict[str, int | None] = {}
    for name, text in (("since", since), ("until", until)):
        try:
            bounds[name] = parse_instant(text, now) if text is not None else None
        except WindowError as exc:
            raise ExportUsageError(f"--{name}: {exc}") from None
    start, end = bounds["since"], bounds["until"]
    if start is not None and end is not None and start >= end:
        raise ExportUsageError("--since must be before --until")
    if any(not agent.strip() for agent in agents):
        raise ExportUsageError("--agent must not be empty")
    return Selection(since=start, until=end, agents=tuple(agent.strip() for agent in agents))


@dataclass(frozen=True)
class Destination:
    """Where the data goes: a file path, or standard output when `path` is None."""

    path: Path | None

    @classmethod
    def of(cls, output: str | None) -> Destination:
        """`-` or None is standard output; a file's directory must exist (checked now, before anything is read)."""
        if output is None or output == "-":
            return cls(None)
        path = Path(output)
        if not output.strip() or path.is_dir():
            raise ExportUsageError(f"--output: {output!r} is not a file name")
        if not path.parent.is_dir():
            raise ExportUsageError(f"--output: the directory {str(path.parent)!r} does not exist")
        return cls(path)

    def describe(self) -> str:
        return "standard output" if self.path is None else str(self.path)

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """The stream to write; a file appears at `path` only if the block ends without an error."""
        if self.path is None:
            yield sys.stdout.buffer
            sys.stdout.buffer.flush()
            return
        descriptor, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part")
        try:
            with os.fdopen(descriptor, "wb") as stream:
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def export(
    engine: Engine, selection: Selection, fmt: Format, stream: BinaryIO, on_batch: Callable[[int], None] | None = None
) -> int:
    """Write every record of `selection` to `stream` in `fmt`; returns how many."""
    writer = open_writer(fmt, stream)
    written = 0
    for batch in query.batches(engine, selection, fmt.fields):
        writer.write(batch)
        rows = len(batch[0])
        written += rows
        if on_batch is not None:
            on_batch(rows)
    writer.close()
    return written


def execute(database_url: str, selection: Selection, fmt: Format, destination: Destination) -> int:
    """The command: export with a progress bar on a terminal; returns how many records were written."""
    console = Console(stderr=True)
    engine = create_engine(database_url)
    try:
        with destination.open() as stream:
            if not console.is_terminal:
                return export(engine, selection, fmt, stream)
            with _progress(console, query.count(engine, selection)) as on_batch:
                return export(engine, selection, fmt, stream, on_batch)
    finally:
        engine.dispose()


@contextmanager
def _progress(console: Console, total: int) -> Iterator[Callable[[int], None]]:
    columns = (TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("export", total=total)
        yield lambda done: progress.advance(task, done)
