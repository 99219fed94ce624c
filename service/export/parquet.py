"""Parquet: every field of `GET /v1/conversations/{id}`, the schema fixed up front from record/fields.py.

- Row groups gather batches up to ROW_GROUP_BYTES of Arrow data or ROW_GROUP_ROWS records, whichever comes first.
  One row group per batch of 1,000 made the writer grow by ~17 KB a batch (measured: RSS 155 -> 170 MiB over
  1,000,000 rows): the footer, which it keeps in memory until it closes, holds each row group's column metadata.
  Both bounds are constants, so memory stays flat; readers also prefer row groups of this size.

- Timestamps are Parquet timestamps (UTC, microseconds): the same instants the API writes as ISO-8601, typed so
  that a query can compare them. Arrow takes them as the column type reads them, timezone-aware datetimes.
- Transcript, analysis, metadata, dynamic variables and labels are JSON text, not nested types. Their content is
  ElevenLabs' free-form JSON: a struct inferred from one batch (its keys, their types) would differ from the next
  batch's, while a file has one schema, and a struct fixed in advance would drop whatever ElevenLabs adds. JSON
  text keeps every value as it was sent; DuckDB, pandas and warehouses read it with their JSON functions.
"""

from __future__ import annotations

from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from service.export import columns
from service.export.formats import Format
from service.export.query import Columns
from service.record import fields
from service.record.fields import Kind

_JSON = (Kind.OBJECT, Kind.LIST)

ROW_GROUP_BYTES = 32 * 2**20
ROW_GROUP_ROWS = 64 * 1024

_ARROW_TYPES: dict[Kind, pa.DataType] = {
    Kind.TEXT: pa.string(),
    Kind.INTEGER: pa.int64(),
    Kind.NUMBER: pa.float64(),
    Kind.BOOLEAN: pa.bool_(),
    Kind.OBJECT: pa.string(),  # JSON text: see above
    Kind.LIST: pa.string(),
    Kind.TIMESTAMP: pa.timestamp("us", tz="UTC"),
}


# Min/max statistics let a reader skip row groups, for ids, times, numbers and short text. For JSON text and
# unbounded text they would be whole transcripts and summaries, twice per row group, all kept in the footer that
# the writer holds in memory until it closes: the writer's memory would grow with the file.
_WITH_STATISTICS = tuple(
    entry.name
    for entry in fields.FIELDS
    if not entry.is_json and not (entry.kind is Kind.TEXT and entry.max_length is None)
)


def parquet_schema() -> pa.Schema:
    """One column per field of `GET /v1/conversations/{id}`, in its order, typed by the field's kind."""
    return pa.schema(
        [
            pa.field(name, _ARROW_TYPES[fields.BY_NAME[name].kind], nullable=fields.BY_NAME[name].nullable)
            for name in Format.PARQUET.fields
        ]
    )


class ParquetWriter:
    def __init__(self, stream: BinaryIO) -> None:
        self._schema = parquet_schema()
        # zstd rather than the default snappy: on tests/bench/export.py's rows it wrote 4.3 MB where snappy wrote
        # 7.6 MB, in the same CPU time; DuckDB, pandas, Spark and the warehouses all read it.
        self._writer = pq.ParquetWriter(
            stream, self._schema, compression="zstd", write_statistics=list(_WITH_STATISTICS)
        )

        # JSON as the API's text; every other kind as the column type reads it, which Arrow takes as it is.
        self._values = columns.converters(Format.PARQUET.fields, {kind: columns.TEXT_VALUE[kind] for kind in _JSON})
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0

    def write(self, batch: Columns) -> None:
        values = columns.convert(batch, self._values)
        arrays = [pa.array(column, type=field.type) for column, field in zip(values, self._schema, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._pending_bytes += table.nbytes
        if self._pending_bytes >= ROW_GROUP_BYTES or self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        """The pending batches as one row group."""
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=self._pending_rows)
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
