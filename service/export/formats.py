"""The export's file formats: each writer takes batches of records as the read API serves them (api/reads.py's
`public_record`) and writes them to a binary stream. Apart from that stream, pure.

- JSON lines: one record per line, each exactly the JSON of `GET /v1/conversations/{id}` (the API's own encoder).
- CSV: the list fields (those of `GET /v1/conversations`), a header row of their names. An absent value is an empty
  field; booleans are `true`/`false`; objects (`dynamic_variables`, `labels`) are JSON text.
- Parquet: every field (export/parquet.py).
"""

from __future__ import annotations

import csv
import io
import operator
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import PurePath
from typing import Any, BinaryIO, Protocol

from service.api.routes import json_bytes
from service.record import fields
from service.record.fields import Kind
from service.record.public import RECORD_FIELDS

Record = dict[str, Any]


class Format(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"

    @property
    def detail(self) -> bool:
        """Whether its records carry transcript, analysis and metadata (else only the list fields)."""
        return self is not Format.CSV


class FormatError(ValueError):
    """A format that cannot be used; `str()` says why, for the user."""


_SUFFIXES = {".jsonl": Format.JSONL, ".ndjson": Format.JSONL, ".csv": Format.CSV, ".parquet": Format.PARQUET}


def choose_format(name: str | None, output: str | None) -> Format:
    """`--format` when given, else the output file's suffix when it names a format, else JSON lines."""
    if name is not None:
        try:
            return Format(name.strip().lower())
        except ValueError:
            choices = ", ".join(f.value for f in Format)
            raise FormatError(f"--format must be one of {choices}, not {name!r}") from None
    if output is not None and output != "-":
        return _SUFFIXES.get(PurePath(output).suffix.lower(), Format.JSONL)
    return Format.JSONL


class Writer(Protocol):
    def write(self, batch: Sequence[Record]) -> None: ...

    def close(self) -> None:
        """Finish the output (a footer, buffered text); the stream itself stays open, for its owner to close."""


def open_writer(fmt: Format, stream: BinaryIO) -> Writer:
    if fmt is Format.JSONL:
        return JsonLinesWriter(stream)
    if fmt is Format.CSV:
        return CsvWriter(stream)
    # Imported here: pyarrow adds ~60 MiB of RSS and a second of start-up that JSON lines and CSV do not need.
    from service.export.parquet import ParquetWriter

    return ParquetWriter(stream)


class JsonLinesWriter:
    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, batch: Sequence[Record]) -> None:
        self._stream.write(b"".join(json_bytes(record) + b"\n" for record in batch))

    def close(self) -> None:
        self._stream.flush()


def _csv_boolean(value: Any) -> Any:
    return value if value is None else ("true" if value else "false")


def json_text(value: Any) -> Any:
    """An object or list as the API's JSON, as text; None stays None."""
    return value if value is None else json_bytes(value).decode()


# A field's CSV text, for the fields whose Python value would not already be written as users expect.
_CSV_CELL: dict[Kind, Callable[[Any], Any]] = {
    Kind.BOOLEAN: _csv_boolean,
    Kind.OBJECT: json_text,
    Kind.LIST: json_text,
}


class CsvWriter:
    def __init__(self, stream: BinaryIO) -> None:
        self._text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        self._csv = csv.writer(self._text, lineterminator="\n")
        self._csv.writerow(RECORD_FIELDS)
        kinds = {name: fields.BY_NAME[name].kind for name in RECORD_FIELDS}
        self._converted = [(name, _CSV_CELL[kind]) for name, kind in kinds.items() if kind in _CSV_CELL]
        self._row = operator.itemgetter(*RECORD_FIELDS)

    def write(self, batch: Sequence[Record]) -> None:
        for record in batch:  # the batch's records are this export's own: converted in place, then read once
            for name, convert in self._converted:
                record[name] = convert(record[name])
        self._csv.writerows(map(self._row, batch))

    def close(self) -> None:
        self._text.flush()
        self._text.detach()  # the stream belongs to the caller
