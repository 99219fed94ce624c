"""The export's file formats: each writer takes batches of columns as the export reads them (export/query.py),
turns each column into what the format writes (export/columns.py), and writes to a binary stream. Apart from that
stream, pure. Every format holds what the read API serves:

- JSON lines: one record per line, each exactly the JSON of `GET /v1/conversations/{id}` (the API's own encoder).
- CSV: the list fields (those of `GET /v1/conversations`), a header row of their names. An absent value is an empty
  field; booleans are `true`/`false`; objects (`dynamic_variables`, `labels`) are JSON text.
- Parquet: every field (export/parquet.py).
"""

from __future__ import annotations

import csv
import io
from enum import StrEnum
from pathlib import PurePath
from typing import BinaryIO, Protocol

from service.api.routes import json_bytes
from service.export import columns
from service.export.query import Columns
from service.record.public import DETAIL_FIELDS, RECORD_FIELDS


class Format(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"

    @property
    def fields(self) -> tuple[str, ...]:
        """Its columns: every field of `GET /v1/conversations/{id}`, but for CSV only the list fields."""
        return RECORD_FIELDS if self is Format.CSV else (*RECORD_FIELDS, *DETAIL_FIELDS)


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
    def write(self, batch: Columns) -> None:
        """One batch: a column per field of its format, in `Format.fields`' order."""

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
        self._names = Format.JSONL.fields
        self._values = columns.converters(self._names, columns.API_VALUE)

    def write(self, batch: Columns) -> None:
        rows = zip(*columns.convert(batch, self._values), strict=True)
        self._stream.write(b"".join(json_bytes(dict(zip(self._names, row, strict=True))) + b"\n" for row in rows))

    def close(self) -> None:
        self._stream.flush()


class CsvWriter:
    def __init__(self, stream: BinaryIO) -> None:
        self._text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        self._csv = csv.writer(self._text, lineterminator="\n")
        self._csv.writerow(Format.CSV.fields)
        self._cells = columns.converters(Format.CSV.fields, columns.TEXT_VALUE)

    def write(self, batch: Columns) -> None:
        # None is an empty field, numbers are written as str() writes them: the csv module's own rules.
        self._csv.writerows(zip(*columns.convert(batch, self._cells), strict=True))

    def close(self) -> None:
        self._text.flush()
        self._text.detach()  # the stream belongs to the caller
