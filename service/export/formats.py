"""The export's file formats: each writer takes batches of records as the read API serves them (api/reads.py's
`public_record`) and writes them to a binary stream. Apart from that stream, pure.

- JSON lines: one record per line, each exactly the JSON of `GET /v1/conversations/{id}` (the API's own encoder).
- CSV: the list fields (those of `GET /v1/conversations`), a header row of their names. An absent value is an empty
  field; booleans are `true`/`false`; objects (`dynamic_variables`, `labels`) are JSON text.
- Parquet: every field, one row group per batch, the schema fixed up front from record/fields.py. Timestamps are
  Parquet timestamps (UTC, microseconds): the same instants the API writes as ISO-8601, typed so that a query can
  compare them. Transcript, analysis, metadata, dynamic variables and labels are JSON text, not nested types:
  their content is ElevenLabs' free-form JSON, so the struct inferred from one batch (a key, a type) would differ
  from the next batch's, and one file has one schema. JSON text holds every value as it was sent, and DuckDB,
  pandas and warehouses read it with their JSON functions.
"""

from __future__ import annotations

import csv
import io
import operator
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import PurePath
from typing import Any, BinaryIO, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from service.api.reads import DETAIL_FIELDS, RECORD_FIELDS
from service.api.routes import json_bytes
from service.record import fields
from service.record.fields import Kind

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


def _json_text(value: Any) -> Any:
    return value if value is None else json_bytes(value).decode()


# A field's CSV text, for the fields whose Python value would not already be written as users expect.
_CSV_CELL: dict[Kind, Callable[[Any], Any]] = {
    Kind.BOOLEAN: _csv_boolean,
    Kind.OBJECT: _json_text,
    Kind.LIST: _json_text,
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


_ARROW_TYPES: dict[Kind, pa.DataType] = {
    Kind.TEXT: pa.string(),
    Kind.INTEGER: pa.int64(),
    Kind.NUMBER: pa.float64(),
    Kind.BOOLEAN: pa.bool_(),
    Kind.OBJECT: pa.string(),  # JSON text: see the module's docstring
    Kind.LIST: pa.string(),
    Kind.TIMESTAMP: pa.timestamp("us", tz="UTC"),
}


def parquet_schema() -> pa.Schema:
    """One column per field of `GET /v1/conversations/{id}`, in its order, typed by the field's kind."""
    return pa.schema(
        [
            pa.field(name, _ARROW_TYPES[fields.BY_NAME[name].kind], nullable=fields.BY_NAME[name].nullable)
            for name in (*RECORD_FIELDS, *DETAIL_FIELDS)
        ]
    )


class ParquetWriter:
    def __init__(self, stream: BinaryIO) -> None:
        self._schema = parquet_schema()
        # zstd: transcripts are repetitive JSON text; it shrinks them much more than snappy does, and every
        # Parquet reader of note (DuckDB, pandas, Spark, BigQuery) reads it.
        self._writer = pq.ParquetWriter(stream, self._schema, compression="zstd")

    def write(self, batch: Sequence[Record]) -> None:
        if batch:
            columns = [_arrow_column(field, [record[field.name] for record in batch]) for field in self._schema]
            self._writer.write_table(pa.Table.from_arrays(columns, schema=self._schema))

    def close(self) -> None:
        self._writer.close()


def _arrow_column(field: pa.Field, values: list[Any]) -> pa.Array:
    entry = fields.BY_NAME[field.name]
    if entry.is_json:
        return pa.array([_json_text(value) for value in values], type=pa.string())
    if entry.kind is Kind.TIMESTAMP:
        # The record holds the API's ISO-8601 text (api/reads.py writes it); Arrow reads it back to the same instant.
        return pc.cast(pa.array(values, type=pa.string()), field.type)
    return pa.array(values, type=field.type)
