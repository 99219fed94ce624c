"""Export benchmark: N conversations in PostgreSQL, `postcall export` in each format against `psql \\copy` of the
same rows and columns, in the same run.

    uv run python -m tests.bench.export [--count 1000000] [--formats jsonl,csv,parquet] [--runs 1]

The rows are loaded with COPY by tests/bench/read_api.py's loader (its shape is what record.store stores; 1% have
no start time). Each export runs as `python -m service export --format F` in a child process of its own, writing to
standard output redirected to a file, exactly as a user would pipe it; its peak RSS is the child's own high-water
mark (wait4). `psql -c "\\copy (SELECT <columns> …) TO STDOUT (FORMAT csv)"` writes the same rows in the same
order to a file the same way: with the CSV's columns (the list fields) for CSV, and with every field for JSON lines
and Parquet. The ratio is psql's time over the export's: 1.0 would be as fast as psql.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from service.api.reads import DETAIL_FIELDS, RECORD_FIELDS
from service.export.formats import Format
from service.storage.db import create_engine
from service.storage.migrations import upgrade
from tests.bench.read_api import load_postgresql, postgresql_database


@dataclass(frozen=True)
class Run:
    seconds: float
    output_bytes: int
    peak_rss_bytes: int


def timed_child(command: list[str], output: Path, env: dict[str, str]) -> Run:
    """Run `command` with its standard output in `output`; its wall time and its own peak RSS.

    The peak comes from GNU time (`%M`, the child's ru_maxrss): the child of a process that forks from this big one
    would inherit its high-water mark, so this process cannot read a child's peak from wait4 itself.
    """
    measured = ["/usr/bin/time", "-f", "peak_rss_kib=%M", *command]
    with output.open("wb") as sink:
        started = time.perf_counter()
        done = subprocess.run(measured, stdout=sink, stderr=subprocess.PIPE, env=env, check=False)
        seconds = time.perf_counter() - started
    errors = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"{command[:4]} exited {done.returncode}: {errors}")
    peak_kib = int(errors.strip().splitlines()[-1].removeprefix("peak_rss_kib="))
    return Run(seconds, output.stat().st_size, peak_kib * 1024)


def psql_copy(libpq_url: str, columns: tuple[str, ...], output: Path) -> Run:
    names = ", ".join(f'"{name}"' for name in columns)
    copy = (
        f"\\copy (SELECT {names} FROM conversation ORDER BY start_time_unix_secs, conversation_id)"
        " TO STDOUT (FORMAT csv, HEADER)"
    )
    return timed_child(["psql", "-X", "-q", libpq_url, "-c", copy], output, dict(os.environ))


def export(database_url: str, fmt: Format, output: Path) -> Run:
    command = [sys.executable, "-m", "service", "export", "--format", fmt.value]
    return timed_child(command, output, _export_env(database_url))


def _export_env(database_url: str) -> dict[str, str]:
    env = {**os.environ, "POSTCALL_DATABASE_URL": database_url}
    # With PYTHONDONTWRITEBYTECODE set, every start compiles every module again (3 s on the CI machine), which an
    # installed postcall never does; `warm_up` writes the bytecode once, before anything is timed.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def settle(database_url: str) -> None:
    """VACUUM the freshly loaded table, as autovacuum would have: the first reader of rows just COPYed sets their
    hint bits, writing every page, so whichever of psql and the export ran first would pay for it (psql took
    13.4-13.9 s for 1,000,000 rows when it ran first, 4.9-7.6 s when it ran again)."""
    engine = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("SET statement_timeout = 0")
        conn.exec_driver_sql("VACUUM (ANALYZE) conversation")
    engine.dispose()


def warm_up(database_url: str) -> None:
    command = [sys.executable, "-m", "service", "export", "--format", "parquet", "--until", "1"]
    subprocess.run(command, env=_export_env(database_url), check=True, capture_output=True)


def line(label: str, rows: int, run: Run, baseline: Run | None) -> str:
    ratio = f"{baseline.seconds / run.seconds:6.2f}x" if baseline is not None else "       "
    return (
        f"  {label:26s} {run.seconds:8.1f} s {rows / run.seconds:11,.0f} rows/s"
        f" {run.output_bytes / run.seconds / 1e6:8.1f} MB/s {run.output_bytes / 1e6:9.1f} MB"
        f" {run.peak_rss_bytes / 2**20:9.1f} MiB  {ratio}"
    )


def bench(count: int, formats: list[Format], runs: int, tmp: Path) -> None:
    with postgresql_database() as url:
        engine = create_engine(url)
        upgrade(engine)
        started = time.perf_counter()
        load_postgresql(engine, count)
        engine.dispose()
        settle(url)
        print(f"PostgreSQL: loaded {count:,} conversations in {time.perf_counter() - started:.0f} s")
        warm_up(url)
        libpq_url = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        header = f"  {'':26s} {'time':>10s} {'rows/s':>18s} {'MB/s':>13s} {'size':>12s} {'peak RSS':>13s}  psql/export"
        print(header)
        for _ in range(runs):
            listed = psql_copy(libpq_url, RECORD_FIELDS, tmp / "psql-list.csv")
            whole = psql_copy(libpq_url, (*RECORD_FIELDS, *DETAIL_FIELDS), tmp / "psql-all.csv")
            print(line("psql \\copy, list fields", count, listed, None))
            print(line("psql \\copy, every field", count, whole, None))
            for fmt in formats:
                run = export(url, fmt, tmp / f"export.{fmt.value}")
                baseline = listed if fmt is Format.CSV else whole
                print(line(f"postcall export {fmt.value}", count, run, baseline))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--formats", default=",".join(f.value for f in Format))
    parser.add_argument("--runs", type=int, default=1, help="rounds of psql and every format, on the same rows")
    args = parser.parse_args()
    formats = [Format(name) for name in args.formats.split(",")]
    with tempfile.TemporaryDirectory(prefix="postcall-bench-export-") as tmp:
        bench(args.count, formats, args.runs, Path(tmp))


if __name__ == "__main__":
    main()
