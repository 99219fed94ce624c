"""Export benchmark: N conversations in PostgreSQL, `postcall export` in each format against `psql \\copy` of the
same rows and columns, in the same run.

    uv run python -m tests.bench.export [--count 1000000] [--formats jsonl,csv,parquet] [--runs 1] [--stages]

The rows are loaded with COPY by tests/bench/read_api.py's loader (its shape is what record.store stores; 1% have
no start time). Each export runs as `python -m service export --format F` in a child process of its own, writing to
standard output redirected to a file, exactly as a user would pipe it; its peak RSS is the child's own high-water
mark (wait4). `psql -c "\\copy (SELECT <columns> …) TO STDOUT (FORMAT csv)"` writes the same rows in the same
order to a file the same way: with the CSV's columns (the list fields) for CSV, and with every field for JSON lines
and Parquet. The ratio is psql's time over the export's: 1.0 would be as fast as psql. Each child's CPU time (user
+ system) is printed beside its wall time: on a shared machine the wall time also counts waiting for a core.

`--stages` adds where a CSV export's CPU goes over the same rows (best of `--runs`), each in a process of its own:
the driver's fetch alone, then each stage added in turn, and the start-up of an export that writes nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import sqlalchemy as sa

from service.export import columns, command, query
from service.export.formats import Format
from service.export.query import Selection
from service.record.public import DETAIL_FIELDS, RECORD_FIELDS
from service.storage.db import create_engine
from service.storage.migrations import upgrade
from tests.bench.read_api import load_postgresql, postgresql_database


@dataclass(frozen=True)
class Run:
    seconds: float
    output_bytes: int
    peak_rss_bytes: int
    cpu_seconds: float


def timed_child(command: list[str], output: Path, env: dict[str, str]) -> Run:
    """Run `command` with its standard output in `output`; its wall time, CPU time and its own peak RSS.

    They come from GNU time (`%U %S %M`; the peak is the child's ru_maxrss): the child of a process that forks from
    this big one would inherit its high-water mark, so this process cannot read a child's peak from wait4 itself.
    """
    measured = ["/usr/bin/time", "-f", "%U %S %M", *command]
    with output.open("wb") as sink:
        started = time.perf_counter()
        done = subprocess.run(measured, stdout=sink, stderr=subprocess.PIPE, env=env, check=False)
        seconds = time.perf_counter() - started
    errors = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"{command[:4]} exited {done.returncode}: {errors}")
    user, system, peak_kib = errors.strip().splitlines()[-1].split()
    return Run(seconds, output.stat().st_size, int(peak_kib) * 1024, float(user) + float(system))


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
        f"  {label:26s} {run.seconds:8.1f} s {run.cpu_seconds:8.1f} s {rows / run.seconds:11,.0f} rows/s"
        f" {run.output_bytes / run.seconds / 1e6:8.1f} MB/s {run.output_bytes / 1e6:9.1f} MB"
        f" {run.peak_rss_bytes / 2**20:9.1f} MiB  {ratio}"
    )


def bench(count: int, formats: list[Format], runs: int, with_stages: bool, tmp: Path) -> None:
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
        header = (
            f"  {'':26s} {'time':>10s} {'CPU':>10s} {'rows/s':>18s} {'MB/s':>13s} {'size':>12s} {'peak RSS':>13s}"
            "  psql/export"
        )
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
        if with_stages:
            print_stages(url, count, runs, tmp)


STAGES = ("fetch", "read", "convert", "write")
_STAGE_LABELS = {
    "fetch": "psycopg's COPY rows alone",
    "read": "+ column types (batches)",
    "convert": "+ CSV cells (columns)",
    "write": "+ csv writer (export)",
}


def run_stage(stage: str, url: str) -> float:
    """The CPU time (every thread of this process) of a CSV export cut after `stage`, its imports left out."""
    engine = create_engine(url)
    names = Format.CSV.fields
    cells = columns.converters(names, columns.TEXT_VALUE)
    started = time.process_time()
    if stage == "fetch":  # as export/query.py reads PostgreSQL, without the column types
        listed = ", ".join(f'"{name}"' for name in names)
        sql = f"SELECT {listed} FROM conversation ORDER BY start_time_unix_secs, conversation_id"
        raw = engine.raw_connection()
        try:
            cursor = raw.driver_connection.cursor()  # type: ignore[union-attr]
            cursor.execute("SET statement_timeout = 0")  # as the export does: the service's 10 s is for requests
            cursor.execute(f"{sql} LIMIT 0")
            types = [column[1] for column in cursor.description]
            with cursor.copy(f"COPY ({sql}) TO STDOUT (FORMAT BINARY)") as copy:
                copy.set_types(types)
                rows = copy.rows()
                while list(islice(rows, query.BATCH_ROWS)):
                    pass
            raw.commit()
        finally:
            raw.close()
    elif stage == "write":
        with open(os.devnull, "wb") as sink:
            command.export(engine, Selection(), Format.CSV, sink)
    else:
        for batch in query.batches(engine, Selection(), names):
            if stage == "convert":
                columns.convert(batch, cells)
    seconds = time.process_time() - started
    engine.dispose()
    return seconds


def print_stages(url: str, count: int, runs: int, tmp: Path) -> None:
    """Where a CSV export's CPU goes: each stage in a fresh process, as an export runs (in this big one, the same
    work measured 30% more CPU), each line adding one stage to the one above; the least of `runs`."""
    print(f"CSV export's CPU, best of {runs}, each line adding a stage to the one above:")
    env = _export_env(url)
    for stage in STAGES:
        command = [sys.executable, "-m", "tests.bench.export", "--stage", stage]
        seconds = min(
            float(subprocess.run(command, env=env, check=True, capture_output=True).stdout) for _ in range(runs)
        )
        print(f"  {_STAGE_LABELS[stage]:28s} {seconds:7.2f} s {seconds / count * 1e6:7.2f} us/row")
    empty = [sys.executable, "-m", "service", "export", "--format", "csv", "--until", "1"]
    startup = min(timed_child(empty, tmp / "empty.csv", env).cpu_seconds for _ in range(runs))
    print(f"  {'start-up (empty export)':28s} {startup:7.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--formats", default=",".join(f.value for f in Format))
    parser.add_argument("--runs", type=int, default=1, help="rounds of psql and every format, on the same rows")
    parser.add_argument("--stages", action="store_true", help="also where a CSV export's CPU goes, stage by stage")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # one of them, in the child it runs in
    args = parser.parse_args()
    if args.stage is not None:
        print(run_stage(args.stage, os.environ["POSTCALL_DATABASE_URL"]))
        return
    formats = [Format(name) for name in args.formats.split(",")]
    with tempfile.TemporaryDirectory(prefix="postcall-bench-export-") as tmp:
        bench(args.count, formats, args.runs, args.stages, Path(tmp))


if __name__ == "__main__":
    main()
