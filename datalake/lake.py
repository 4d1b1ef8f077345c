"""Lake layout, Parquet writing and the path handles silver reads bronze through.

Layout (DESIGN §3.4, §2):
- bronze:  ``<root>/<table>/ingestion_date=YYYY-MM-DD/<table>_<run_id>.parquet`` (append-only)
- others:  ``<root>/<asset>/<partition key>.parquet`` or ``<root>/<asset>/<asset>.parquet``

Every file is zstd-compressed with statistics and appears atomically (``LakeStorage.atomic_writer``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import datetime as dt
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import dagster as dg
import fsspec
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
from pydantic import PrivateAttr

from datalake.settings import default_duckdb_spill_directory
from datalake.storage import (
    AZURE_BLOCK_SIZE,
    SPLIT_AZURE_BLOCK_SIZE,
    AtomicGroup,
    LakeStorage,
    ProtocolAlias,
    safe_segment,
)

# polars and DuckDB are imported where they are used, not here: a bronze run needs neither, and
# together they are ~40 MB of a run worker's memory.
# pyarrow.compute's kernels are generated at import time; type checkers cannot see them.
pc: Any = pyarrow.compute

if TYPE_CHECKING:
    import duckdb
    import polars as pl
    from duckdb import DuckDBPyRelation as Relation
else:
    # What asset functions declare they return; Dagster resolves the annotation at load time.
    Relation = Any


def loaded_class(module: str, name: str) -> type | None:
    """A library's class if the library was imported, without importing it (else None)."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name) if loaded is not None else None


def loaded_instance(obj: Any, module: str, *names: str) -> bool:
    """isinstance against a library's classes without importing it: if it was never imported,
    nothing can be an instance of its classes."""
    classes = tuple(c for c in (loaded_class(module, n) for n in names) if c is not None)
    return bool(classes) and isinstance(obj, classes)


INGESTION_DATE = "ingestion_date"
DEFAULT_ROW_GROUP_SIZE = 122_880  # DuckDB's row-group size: good pruning granularity for its scans
# Asset definition metadata naming the column that places a row in a partition; lets one output
# of a single-run range backfill be split into one file per partition.
PARTITION_COLUMN_KEY = "datalake/partition_column"
COMPRESSION = "zstd"
# Rows count for nothing when they are wide (TEXT, BLOB, JSON): a row group of a lake file also
# ends once it holds ``batch_bytes`` of Arrow data (DATALAKE_BATCH_BYTES; bronze: the spec's), and
# every read that feeds a writer (a source fetch, a batch from DuckDB) is sized to at most this
# share of that. So 500 KB documents are read a few rows at a time, and narrow rows in full batches.
FETCHES_PER_ROW_GROUP = 8
DEFAULT_ROW_GROUP_BYTES = 32 * 2**20
# DuckDB types of one fixed width (at most 16 bytes in Arrow); any other type (VARCHAR, BLOB,
# LIST, STRUCT, UUID — a string in Arrow …) varies per row.
_FIXED_WIDTH_TYPES = frozenset(
    {
        *("boolean", "tinyint", "smallint", "integer", "bigint", "hugeint", "float", "double", "decimal"),
        *("utinyint", "usmallint", "uinteger", "ubigint", "uhugeint", "interval"),
        *("date", "time", "time_ns", "time with time zone", "timestamp with time zone"),
        *("timestamp", "timestamp_s", "timestamp_ms", "timestamp_ns"),
    }
)
FIXED_COLUMN_BYTES = 16
# Rows per batch read from a DuckDB relation whose variable-width columns have no known width:
# one DuckDB vector.
DUCKDB_VECTOR_ROWS = 2048


def rows_per_fetch(limit: int, fetch_bytes: int, row_bytes: int | None) -> int:
    """Rows per fetch: at most ``limit``, and about ``fetch_bytes`` of rows ``row_bytes`` wide."""
    if not row_bytes or fetch_bytes <= 0:
        return limit
    return max(1, min(limit, fetch_bytes // row_bytes))


def relation_batch_rows(
    relation: duckdb.DuckDBPyRelation, row_group_size: int, row_group_bytes: int | None, row_bytes: int | None
) -> int:
    """Rows per Arrow batch read from a DuckDB relation: about an eighth of a row group's bytes.

    Fixed-width columns have a known width. Variable-width ones take ``row_bytes``, the average
    row of the query's inputs (their Parquet footers; an upper bound for a projection or a join
    of them); without it, one DuckDB vector is read at a time.
    """
    if not row_group_bytes:
        return row_group_size
    types = [str(t.id) for t in relation.types]
    width = FIXED_COLUMN_BYTES * len(types)
    if any(t not in _FIXED_WIDTH_TYPES for t in types):
        if not row_bytes:
            return min(row_group_size, DUCKDB_VECTOR_ROWS)
        width = max(width, row_bytes)
    return rows_per_fetch(row_group_size, row_group_bytes // FETCHES_PER_ROW_GROUP, width)


# --- layout ------------------------------------------------------------------------


def bronze_prefix(table: str) -> str:
    return safe_segment(table) + "/"


def bronze_file(table: str, ingestion_date: str, run_id: str) -> str:
    return f"{safe_segment(table)}/{INGESTION_DATE}={safe_segment(ingestion_date)}/{table}_{safe_segment(run_id)}.parquet"


def bronze_partition_of(relative: str) -> str | None:
    """The ingestion date a bronze file belongs to, from its path."""
    for part in relative.split("/"):
        if part.startswith(INGESTION_DATE + "="):
            return part.split("=", 1)[1]
    return None


def asset_prefix(asset: str) -> str:
    return safe_segment(asset) + "/"


def asset_file(asset: str, partition_key: str | None) -> str:
    name = safe_segment(asset)
    return f"{name}/{safe_segment(partition_key) if partition_key is not None else name}.parquet"


# --- schemas in metadata -----------------------------------------------------------


def table_schema(schema: pa.Schema) -> dg.TableSchema:
    """``dagster/column_schema`` from an Arrow schema; types are Arrow's own type strings."""
    return dg.TableSchema(columns=[dg.TableColumn(name=f.name, type=str(f.type)) for f in schema])


_TIMESTAMP = re.compile(r"timestamp\[(s|ms|us|ns)(?:, tz=(.+))?\]")
_DECIMAL = re.compile(r"decimal(32|64|128|256)\((\d+), (-?\d+)\)")
_FIXED_BINARY = re.compile(r"fixed_size_binary\[(\d+)\]")
_LIST = re.compile(r"(large_)?list<\w+: (.+)>")
_DICTIONARY = re.compile(r"dictionary<values=(.+), indices=\w+, ordered=\d>")


def arrow_type(text: str) -> pa.DataType:
    """Inverse of ``str(pa.DataType)`` for the types a lake table holds (not structs or maps)."""
    text = text.strip()
    with contextlib.suppress(ValueError, KeyError):
        return pa.type_for_alias(text)
    if m := _TIMESTAMP.fullmatch(text):
        return pa.timestamp(m.group(1), tz=m.group(2))  # type: ignore[arg-type]
    if m := _DECIMAL.fullmatch(text):
        make = {"32": pa.decimal32, "64": pa.decimal64, "128": pa.decimal128, "256": pa.decimal256}
        return make[m.group(1)](int(m.group(2)), int(m.group(3)))
    if m := _FIXED_BINARY.fullmatch(text):
        return pa.binary(int(m.group(1)))
    if m := _LIST.fullmatch(text):
        item = arrow_type(m.group(2))
        return pa.large_list(item) if m.group(1) else pa.list_(item)
    if m := _DICTIONARY.fullmatch(text):
        return arrow_type(m.group(1))  # the values are what a reader sees
    raise ValueError(f"cannot rebuild Arrow type {text!r}")


def schema_from_table_schema(value: Any) -> pa.Schema | None:
    """The Arrow schema behind a ``dagster/column_schema`` entry; None if it cannot be rebuilt."""
    if isinstance(value, dg.TableSchemaMetadataValue):
        value = value.value
    if not isinstance(value, dg.TableSchema) or not value.columns:
        return None
    try:
        return pa.schema([pa.field(c.name, arrow_type(c.type)) for c in value.columns])
    except ValueError:
        return None


# The exact Arrow schema (IPC, base64), recorded only where dagster/column_schema's type strings do
# not rebuild it (structs, maps, dictionaries…): what an empty input of the asset is made from.
ARROW_SCHEMA_KEY = "datalake/arrow_schema"


def _exact_schema_metadata(schema: pa.Schema) -> dict[str, str]:
    rebuilt = schema_from_table_schema(table_schema(schema))
    if rebuilt is not None and rebuilt.names == schema.names and rebuilt.types == schema.types:
        return {}
    return {ARROW_SCHEMA_KEY: base64.b64encode(schema.remove_metadata().serialize().to_pybytes()).decode()}


def schema_from_metadata(metadata: Mapping[str, Any]) -> pa.Schema | None:
    """The schema a materialization (or a definition) records: exact if it was, else rebuilt."""
    exact = metadata.get(ARROW_SCHEMA_KEY)
    if isinstance(exact, dg.TextMetadataValue):
        exact = exact.value
    if isinstance(exact, str):
        with contextlib.suppress(ValueError, pa.ArrowInvalid):
            return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(exact)))
    return schema_from_table_schema(metadata.get("dagster/column_schema"))


# --- writing -----------------------------------------------------------------------


@dataclass
class WriteResult:
    relative: str
    uri: str
    rows: int = 0
    row_groups: int = 0
    bytes: int = 0
    schema: pa.Schema | None = None


# Which columns to dictionary-encode: all (True), none (False), a list, or a rule that picks them
# from the file's first row group (bronze, see datalake/extract.py: dictionary_columns).
Dictionary = bool | list[str] | Callable[[pa.Table], list[str]]


def delta_encodable(type_: pa.DataType) -> bool:
    """Stored as Parquet INT32/INT64 (decimals up to 18 digits too, see _ParquetSink.writer):
    what DELTA_BINARY_PACKED encodes."""
    t = pa.types
    return (
        t.is_integer(type_)
        or t.is_timestamp(type_)
        or t.is_date32(type_)
        or t.is_duration(type_)
        or (t.is_decimal(type_) and type_.precision <= 18)
    )


def _encodings(schema: pa.Schema, dictionary: bool | list[str]) -> dict[str, str] | None:
    """DELTA_BINARY_PACKED for the integer-like columns written without a dictionary.

    Those are the (nearly) unique ones: keys, cursors, sequences, event times. In a bronze file
    they mostly ascend, and delta encoding stores them in a few bits a value where plain
    encoding stores 8 bytes for zstd to squeeze: on the benchmark's CDR table the file is 25%
    smaller and the writer uses ~9% less CPU. DuckDB, polars and pyarrow all read it.
    """
    if dictionary is True:
        return None
    chosen = set(dictionary) if isinstance(dictionary, list) else set()
    delta = {
        f.name: "DELTA_BINARY_PACKED" for f in schema if f.name not in chosen and delta_encodable(f.type)
    }
    return delta or None


class _ParquetSink:
    """One Parquet file being written from record batches.

    ``row_group_size=None``: each incoming batch is one row group (bronze: one source batch = one
    row group). Otherwise batches are buffered and written in row groups of that many rows, so a
    stream of small batches does not produce small row groups; with ``row_group_bytes`` a row
    group also ends once the buffered batches hold that many bytes (wide rows: documents, blobs).
    The Parquet writer opens with the first row group, so a dictionary rule can look at its rows.
    """

    def __init__(
        self,
        handle: pa.NativeFile | IO[bytes],
        schema: pa.Schema,
        row_group_size: int | None,
        dictionary_pagesize_limit: int | None = None,
        use_dictionary: Dictionary = True,
        row_group_bytes: int | None = None,
    ):
        self.handle = handle
        self.schema = schema
        self.row_group_size = row_group_size
        self.row_group_bytes = row_group_bytes
        self.dictionary_pagesize_limit = dictionary_pagesize_limit
        self.use_dictionary = use_dictionary
        self._writer: pq.ParquetWriter | None = None
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.pending_bytes = 0
        self.rows = 0
        self.row_groups = 0

    def writer(self, first: pa.Table) -> pq.ParquetWriter:
        if self._writer is None:
            chosen = self.use_dictionary
            dictionary = chosen(first) if callable(chosen) else chosen
            self._writer = pq.ParquetWriter(
                self.handle,
                self.schema,
                compression=COMPRESSION,
                write_statistics=True,
                use_dictionary=dictionary,  # type: ignore[arg-type]  # a list is documented; the stubs say bool
                column_encoding=_encodings(self.schema, dictionary),  # type: ignore[arg-type]
                # DECIMAL(p <= 18) as INT32/INT64 instead of big-endian fixed-length bytes: the
                # same logical type for every reader, and a scan summing a plain-encoded
                # DECIMAL(12,4) takes half the time in DuckDB and polars (lake benchmark).
                store_decimal_as_integer=True,
                dictionary_pagesize_limit=self.dictionary_pagesize_limit,
            )
        return self._writer

    def abort(self) -> None:
        """Closes the writer after a failure (the file itself is discarded by its atomic writer)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        if batch.schema != self.schema:
            batch = _conform(batch, self.schema)
        if (
            self.row_group_bytes
            and self.row_group_size is not None
            and batch.nbytes > self.row_group_bytes
            and batch.num_rows > 1
        ):
            # One incoming batch beyond the byte bound (a Table's, cut by rows): row groups of it.
            width = -(-batch.nbytes // batch.num_rows)
            step = rows_per_fetch(min(batch.num_rows, self.row_group_size), self.row_group_bytes, width)
            self._flush(final=True)
            for start in range(0, batch.num_rows, step):
                self.pending, self.pending_rows = (
                    [batch.slice(start, step)],
                    min(step, batch.num_rows - start),
                )
                self._flush(final=True)
            return
        if self.row_group_size is None:
            table = pa.Table.from_batches([batch])
            self.writer(table).write_table(table, row_group_size=batch.num_rows)
            self.rows += batch.num_rows
            self.row_groups += 1
            return
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        self.pending_bytes += batch.nbytes
        if self.row_group_bytes and self.pending_bytes >= self.row_group_bytes:
            self._flush(final=True)  # what is buffered, as one (shorter) row group
        elif self.pending_rows >= self.row_group_size:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self.pending:
            return
        table = pa.Table.from_batches(self.pending, schema=self.schema)
        size = self.row_group_size or table.num_rows
        # Whole row groups only, until the end (or a memory flush): the remainder waits for more rows.
        cut = table.num_rows if final else (table.num_rows // size) * size
        head, rest = table.slice(0, cut), table.slice(cut)
        if head.num_rows:
            self.writer(head).write_table(head, row_group_size=size)
            self.rows += head.num_rows
            self.row_groups += -(-head.num_rows // size)
        # A copy of just the remainder: slices would keep the whole incoming batches alive.
        self.pending = rest.combine_chunks().to_batches() if rest.num_rows else []
        self.pending_rows = rest.num_rows
        self.pending_bytes = sum(b.nbytes for b in self.pending)

    def flush_pending(self) -> None:
        """Writes what is buffered as a (short) row group now, to free its memory."""
        self._flush(final=True)

    def close(self) -> None:
        self._flush(final=True)
        # No rows at all: the file still gets the schema.
        (self._writer or self.writer(self.schema.empty_table())).close()


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    if batch.schema.names != schema.names:
        batch = batch.select(schema.names)
    return batch.cast(schema)


def write_parquet(
    storage: LakeStorage,
    relative: str,
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    *,
    row_group_size: int | None = None,
    use_dictionary: Dictionary = True,
    row_group_bytes: int | None = None,
    group: AtomicGroup | None = None,
) -> WriteResult:
    """Streams batches into one Parquet file that becomes visible atomically.

    ``use_dictionary``: all columns (the default), the columns to dictionary-encode, or a rule
    that picks them from the first row group. ``row_group_bytes``: a row group also ends once
    it holds that many bytes of Arrow data. ``group``: visible with the group's other files.
    """
    # A group's files stay open until it publishes: on Azure each holds its unstaged block till then.
    block = SPLIT_AZURE_BLOCK_SIZE if group is not None else AZURE_BLOCK_SIZE
    with storage.atomic_arrow_writer(relative, block, group=group) as handle:
        sink = _ParquetSink(
            handle, schema, row_group_size, use_dictionary=use_dictionary, row_group_bytes=row_group_bytes
        )
        try:
            for batch in batches:
                sink.write(batch)
        except BaseException:
            sink.abort()
            raise
        sink.close()
        written = handle.tell()  # the file's size: in a group it is not under its name yet
    return WriteResult(
        relative=relative,
        uri=storage.uri(relative),
        rows=sink.rows,
        row_groups=sink.row_groups,
        bytes=written,
        schema=schema,
    )


def write_output(
    storage: LakeStorage,
    relative: str,
    obj: Any,
    *,
    row_group_size: int,
    row_group_bytes: int | None = None,
    row_bytes: int | None = None,
    group: AtomicGroup | None = None,
) -> WriteResult:
    """Any supported output into one file, streamed: a LazyFrame is sunk, never collected.

    Row groups end at ``row_group_size`` rows or ``row_group_bytes`` of Arrow data (a LazyFrame's:
    rows only, as polars' own sink counts them; its width is not known before it runs).
    ``row_bytes``: the average input row, which sizes DuckDB reads.
    ``group``: visible with the group's other files (polars frames then stream as Arrow batches,
    since what polars' sink wrote is read back from the file's footer under its name).
    """
    if group is None and loaded_instance(obj, "polars", "LazyFrame", "DataFrame"):
        with storage.atomic_writer(relative) as handle:
            if loaded_instance(obj, "polars", "LazyFrame"):
                obj.sink_parquet(
                    handle, compression=COMPRESSION, statistics=True, row_group_size=row_group_size
                )
            else:
                if row_group_bytes and obj.height:  # polars counts rows: as many as fit the bytes
                    row_bytes_now = -(-int(obj.estimated_size()) // obj.height)
                    row_group_size = rows_per_fetch(row_group_size, row_group_bytes, row_bytes_now)
                obj.write_parquet(
                    handle, compression=COMPRESSION, statistics=True, row_group_size=row_group_size
                )
        footer = storage.read_metadata(relative)
        return WriteResult(
            relative=relative,
            uri=storage.uri(relative),
            rows=footer.num_rows,
            row_groups=footer.num_row_groups,
            bytes=storage.size(relative),
            schema=footer.schema.to_arrow_schema(),
        )
    schema, batches = record_batches(obj, row_group_size, row_group_bytes, row_bytes)
    return write_parquet(
        storage,
        relative,
        schema,
        batches,
        row_group_size=row_group_size,
        row_group_bytes=row_group_bytes,
        group=group,
    )


# Row groups a range split may hold in memory across all partitions before it writes short ones.
PENDING_ROW_GROUPS = 2
# An open Parquet writer keeps its dictionary encoders' memory (~0.5 MB per column at the default
# 1 MiB page limit) while a split keeps one writer per partition open; a smaller limit makes that
# ~1 MB per partition. Low-cardinality columns (the ones dictionaries help) stay well below it.
SPLIT_DICTIONARY_PAGE_LIMIT = 256 * 1024


class PartitionMismatch(ValueError):
    """Rows of a range output that fall in no targeted partition."""


@dataclass(frozen=True)
class PartitionAssigner:
    """Places each row of a range output in one of the targeted partitions, by one column.

    Time-window partitions: a TIMESTAMP value belongs to the partition whose window [start, end)
    contains it (naive values are read in the partitions' time zone); a DATE to the one whose
    window holds that local day (windows of a day or longer; shorter ones: the window holding
    the day's midnight); a string value must equal a key. Other partitions: the value, as text,
    must equal a key.
    """

    column: str
    keys: tuple[str, ...]
    timezone: str | None = None
    starts_us: tuple[int, ...] = ()
    ends_us: tuple[int, ...] = ()
    # Local days (since 1970-01-01) of each window's start and end, when every window spans a day
    # or more: a DATE is matched by day, as midnight does not exist on some days (a DST change at
    # 00:00, e.g. Africa/Cairo or America/Santiago) and would match no window.
    start_days: tuple[int, ...] = ()
    end_days: tuple[int, ...] = ()

    @classmethod
    def for_partitions(
        cls, partitions_def: dg.PartitionsDefinition, keys: Sequence[str], column: str
    ) -> PartitionAssigner:
        if isinstance(partitions_def, dg.MultiPartitionsDefinition):
            raise ValueError("splitting a range output by column is not supported for multi-partitions")
        if isinstance(partitions_def, dg.TimeWindowPartitionsDefinition):
            windows = [partitions_def.time_window_for_partition_key(k) for k in keys]
            start_days = tuple(_epoch_day(w.start) for w in windows)
            end_days = tuple(_epoch_day(w.end) for w in windows)
            by_day = all(end > start for start, end in zip(start_days, end_days, strict=True))
            return cls(
                column=column,
                keys=tuple(keys),
                timezone=partitions_def.timezone,
                starts_us=tuple(_epoch_us(w.start) for w in windows),
                ends_us=tuple(_epoch_us(w.end) for w in windows),
                start_days=start_days if by_day else (),
                end_days=end_days if by_day else (),
            )
        return cls(column=column, keys=tuple(keys))

    def assign(self, batch: pa.RecordBatch) -> pl.Series:
        """Index into ``keys`` of every row; raises ``PartitionMismatch`` for rows in no partition."""
        import polars as pl

        if self.column not in batch.schema.names:
            raise PartitionMismatch(
                f"the output has no partition column {self.column!r} (columns: {', '.join(batch.schema.names)})"
            )
        original = values = pl.Series(self.column, batch.column(self.column))
        windows = self._windows(values)
        if windows is not None:
            points, starts, ends = windows
            # The window whose start is the last one <= the point; valid only if it ends after it.
            candidate = starts.search_sorted(points, side="right").cast(pl.Int64) - 1
            window_end = ends.gather(candidate.clip(0, len(ends) - 1))
            valid = ((candidate >= 0) & (points < window_end)).fill_null(False)
            index = pl.DataFrame({"i": candidate, "ok": valid}).select(
                pl.when(pl.col("ok")).then(pl.col("i")).otherwise(None)
            )["i"]
        else:
            mapping = {key: i for i, key in enumerate(self.keys)}
            index = values.cast(pl.String).replace_strict(mapping, default=None, return_dtype=pl.Int64)
        missing = index.is_null()
        if missing.any():
            sample = original.filter(missing).head(3).to_list()
            raise PartitionMismatch(
                f"{int(missing.sum())} row(s) have a {self.column!r} outside the targeted partitions "
                f"{self.keys[0]}..{self.keys[-1]} (e.g. {sample})"
            )
        return index.cast(pl.Int32)

    def _windows(self, values: pl.Series) -> tuple[pl.Series, pl.Series, pl.Series] | None:
        """(each value as a point, window starts, window ends) on one scale; None: match keys."""
        import polars as pl

        dtype = values.dtype
        if self.start_days and dtype == pl.Date:
            bounds = (self.start_days, self.end_days)
            points = values.cast(pl.Int64)
        elif self.starts_us and (dtype == pl.Date or isinstance(dtype, pl.Datetime)):
            if dtype == pl.Date:
                values = values.cast(pl.Datetime("us"))
            if values.dtype.time_zone is None:  # type: ignore[union-attr]
                values = values.dt.replace_time_zone(self.timezone, ambiguous="earliest", non_existent="null")
            bounds = (self.starts_us, self.ends_us)
            points = values.dt.epoch("us")
        else:
            return None
        return points, pl.Series(bounds[0], dtype=pl.Int64), pl.Series(bounds[1], dtype=pl.Int64)


def _epoch_us(value: Any) -> int:
    return int(value.timestamp() * 1_000_000)


def _epoch_day(value: Any) -> int:
    """The local calendar day of an aware datetime, as days since 1970-01-01."""
    return (value.date() - dt.date(1970, 1, 1)).days


def write_partitions(
    storage: LakeStorage,
    files: Mapping[str, str],
    obj: Any,
    assigner: PartitionAssigner,
    *,
    row_group_size: int,
    row_group_bytes: int | None = None,
    row_bytes: int | None = None,
) -> dict[str, WriteResult]:
    """One streaming pass over a range output into one file per partition (``files``: key → path).

    Rows keep their order within each partition. Every targeted partition gets a file; one with no
    rows gets an empty file with the output's schema. The files are written completely, then
    published together (``LakeStorage.atomic_group``): none if anything fails first (a row outside
    the range, a read error, a full disk while writing any of them).

    Memory: each partition buffers up to one row group (``row_group_size`` rows or
    ``row_group_bytes``). When the buffers together pass ``PENDING_ROW_GROUPS`` row groups (in rows
    or in bytes), the fullest idle ones are written as short row groups — for output ordered by
    partition (the usual case) only the partition being filled stays buffered. Each open
    partition file costs about 1 MB more (its writer's encoders), and on Azure up to
    ``SPLIT_AZURE_BLOCK_SIZE`` (1 MiB) of bytes not yet staged.
    """
    schema, batches = record_batches(obj, row_group_size, row_group_bytes, row_bytes)
    keys = assigner.keys
    sinks: dict[int, _ParquetSink] = {}
    budget = PENDING_ROW_GROUPS * row_group_size
    byte_budget = PENDING_ROW_GROUPS * row_group_bytes if row_group_bytes else None

    def over_budget(rows: int, size: int) -> bool:
        return rows > budget or (byte_budget is not None and size > byte_budget)

    sizes: dict[int, int] = {}
    # The stack closes every file (last opened first) before the group publishes any.
    with storage.atomic_group() as group, contextlib.ExitStack() as stack:

        def open_sink(i: int) -> _ParquetSink:
            handle = stack.enter_context(
                storage.atomic_arrow_writer(files[keys[i]], SPLIT_AZURE_BLOCK_SIZE, group=group)
            )
            sink = _ParquetSink(
                handle, schema, row_group_size, SPLIT_DICTIONARY_PAGE_LIMIT, row_group_bytes=row_group_bytes
            )

            def finish(exc_type: Any, exc: Any, tb: Any) -> bool:
                if exc_type is None:
                    sink.close()
                    sizes[i] = handle.tell()
                else:
                    sink.abort()
                return False

            stack.push(finish)
            return sink

        for batch in batches:
            if batch.num_rows == 0:
                continue
            index = assigner.assign(batch)
            present = index.unique(maintain_order=True).to_list()
            for i in present:
                part = batch if len(present) == 1 else batch.filter((index == i).to_arrow())
                if i not in sinks:
                    sinks[i] = open_sink(i)
                sinks[i].write(part)
            pending = sum(sink.pending_rows for sink in sinks.values())
            pending_bytes = sum(sink.pending_bytes for sink in sinks.values())
            if over_budget(pending, pending_bytes):
                # The partition just written to keeps its buffer; the fullest others write theirs.
                idle = [sink for i, sink in sinks.items() if i != present[-1]]
                idle.sort(key=lambda sink: (sink.pending_bytes, sink.pending_rows), reverse=True)
                for sink in idle:
                    pending -= sink.pending_rows
                    pending_bytes -= sink.pending_bytes
                    sink.flush_pending()
                    if not over_budget(pending, pending_bytes):
                        break
        for i in range(len(keys)):
            if i not in sinks:
                sinks[i] = open_sink(i)  # closed empty: a file with the schema and no rows
    return {
        keys[i]: WriteResult(
            relative=files[keys[i]],
            uri=storage.uri(files[keys[i]]),
            rows=sink.rows,
            row_groups=sink.row_groups,
            bytes=sizes[i],
            schema=schema,
        )
        for i, sink in sorted(sinks.items())
    }


def average_row_bytes(footer: pq.FileMetaData) -> int | None:
    """A file's uncompressed bytes per row (its column chunks), or None without rows."""
    if not footer.num_rows:
        return None
    total = sum(footer.row_group(i).total_byte_size for i in range(footer.num_row_groups))
    return max(1, -(-total // footer.num_rows))


def output_metadata(written: WriteResult, *, partitioned: bool = False) -> dict[str, Any]:
    """What every materialization records (DESIGN §3.6)."""
    metadata: dict[str, Any] = {
        "dagster/uri": dg.MetadataValue.path(written.uri),
        # Rows this materialization wrote (its file); for a partition that is the partition's rows.
        "dagster/row_count": written.rows,
        "datalake/bytes_written": written.bytes,
        "datalake/row_groups": written.row_groups,
    }
    if partitioned:
        metadata["dagster/partition_row_count"] = written.rows
    if written.schema is not None:
        metadata["dagster/column_schema"] = table_schema(written.schema)
        metadata.update(_exact_schema_metadata(written.schema))
    return metadata


# --- reading -----------------------------------------------------------------------


# A DuckDB variable on each DuckDBResource connection: the threads it wants for remote reads.
REMOTE_THREADS_VARIABLE = "datalake_remote_threads"


class DuckDBResource(dg.ConfigurableResource):
    """In-process DuckDB for silver and gold: one connection per asset execution.

    What a query needs beyond ``memory_limit`` (a sort or window over a large input) spills to
    ``temp_directory`` (default: ``datalake-duckdb`` in the system's temp directory, not DuckDB's
    ``.tmp`` in the working directory, which a container user often cannot create).
    """

    memory_limit: str = "2GB"
    threads: int | None = None
    temp_directory: str | None = None
    # Once the connection reads files on Azure (``ParquetPaths.relation``), it gets at least this
    # many threads (0: keep ``threads``). Each scan thread waits on one request at a time, so
    # remote scans want more threads than cores: with 10 ms added to every Azurite request, the
    # lake benchmark's slice step took 2.36 s with 16 threads, 4.79 s with 2 (one per core here).
    remote_threads: int = 16

    _prepared: concurrent.futures.Future[duckdb.DuckDBPyConnection] | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Creating a database takes DuckDB ~18 ms (its catalog), without the GIL: begun here, it
        # overlaps the step's start and input loading instead of preceding the step's first query.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb-connect")
        self._prepared = pool.submit(self._new_database)
        pool.shutdown(wait=False)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared.done() and prepared.exception() is None:
            prepared.result().close()

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own: the first one of the step was prepared when the resource was set up."""
        prepared, self._prepared = self._prepared, None
        con = prepared.result() if prepared is not None else self._new_database()
        # Configured here, not in the preparing thread: each statement there waits for the GIL,
        # which the step's own thread holds while busy (~25 ms for these, against ~1.5 ms here).
        con.execute(
            # A step binds its input files more than once (the view, then each query over it):
            # parse each footer once. Entries are checked against the file's modification time,
            # and the cache lives as long as this step's connection.
            "SET parquet_metadata_cache = true;"
            # DuckDB's Parquet prefetching is meant for remote files: with it off, scans of local
            # and NFS files measured ~10% faster (the lake benchmark's partner slice, ~44 against
            # ~52 ms, the same as with DuckDB's external file cache off). Reads on Azure turn it
            # back on (``_tune_for_remote_reads``).
            "SET disable_parquet_prefetching = true;"
            # Instants leave DuckDB stamped with its session zone: UTC, as bronze's, whatever the
            # host's TZ (files written on a host in another zone did not read with the others).
            "SET TimeZone = 'UTC';"
            f"SET VARIABLE {REMOTE_THREADS_VARIABLE} = {int(self.remote_threads)};"
        )
        return con

    def _new_database(self) -> duckdb.DuckDBPyConnection:
        import duckdb

        spill = self.temp_directory or default_duckdb_spill_directory()
        os.makedirs(spill, exist_ok=True)  # DuckDB creates the last level only
        config: dict[str, Any] = {"memory_limit": self.memory_limit, "temp_directory": spill}
        if self.threads:
            config["threads"] = self.threads
        return duckdb.connect(config=config)


_DURATION_AS_INTERVAL = {
    "s": "to_seconds({0}) AS {0}",
    "ms": "to_milliseconds({0}) AS {0}",
    "us": "to_microseconds({0}) AS {0}",
    "ns": "to_microseconds({0} // 1000) AS {0}",
}


def quote_identifier(name: str) -> str:
    """A DuckDB identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class ParquetPaths:
    """A path handle: the upstream files for the mapped partitions, and how to read them.

    ``relation(con)`` reads them in place, so DuckDB pushes projections and filters into the
    Parquet scan (row groups are skipped by their statistics). Columns are unified by name across
    files (a column added later reads as NULL in older files). No files gives an empty relation
    with the upstream's schema. On Azure the handle carries the fsspec filesystem DuckDB reads
    through (``files`` are ``abfs://container/path`` on it); it is registered on the connection
    the first time, under a protocol of its own, so inputs on several storage accounts can be
    read by one connection.
    """

    asset_key: dg.AssetKey
    files: tuple[str, ...]
    schema: pa.Schema
    partition_keys: tuple[str, ...] | None = None
    filesystem: fsspec.AbstractFileSystem | None = field(default=None, compare=False)
    # Average bytes of a row (uncompressed, from the newest file's footer): sizes what reads the output.
    row_bytes: int | None = field(default=None, compare=False)
    # On Azure: what DuckDB reads ``files`` through, their footers already fetched and what their
    # listing said at hand (``LakeStorage.footers``), so DuckDB asks Azure nothing more of them.
    footers: ProtocolAlias | None = field(default=None, compare=False, repr=False)
    # Each file's schema, by its entry in ``files``, where the input manager read them.
    file_schemas: Mapping[str, pa.Schema] | None = field(default=None, compare=False, repr=False)

    @property
    def is_empty(self) -> bool:
        return not self.files

    def _one_schema(self) -> bool:
        """Whether every file is known to have the same columns, in the same order, of the same types."""
        schemas = self.file_schemas
        if not schemas or any(f not in schemas for f in self.files):
            return False
        shapes = {tuple((c.name, c.type) for c in schemas[f]) for f in self.files}
        return len(shapes) == 1

    def files_without(self, columns: Sequence[str]) -> list[str]:
        """The files that lack any of ``columns`` (read by name, they give NULL there)."""
        schemas = self.file_schemas or {}
        return [f for f in self.files if f in schemas and not set(columns) <= set(schemas[f].names)]

    def relation(self, con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyRelation:
        if not self.files:
            return con.from_arrow(self.schema.empty_table())
        files = list(self.files)
        if self.filesystem is not None:
            # DuckDB routes paths to a registered filesystem by protocol alone: each input's
            # filesystem (its root's account and credential) is registered under one of its own.
            alias = self.footers or ProtocolAlias(self.filesystem, f"datalake{id(self.filesystem):x}")
            protocol = alias.protocol[0]
            if not con.filesystem_is_registered(protocol):
                con.register_filesystem(alias)
                _tune_for_remote_reads(con)
            files = [f"{protocol}://{f.split('://', 1)[1]}" for f in files]
        # hive_partitioning off: the files' own columns are the schema, the same whether or not
        # any file exists (bronze paths carry ingestion_date=… directories). Files of one schema
        # need no union by name, whose bind parses every footer in turn (~1.6 ms of 2.7 for 30).
        relation = con.read_parquet(files, union_by_name=not self._one_schema(), hive_partitioning=False)
        # A duration (bronze's MySQL TIME) is a plain INT64 to DuckDB's Parquet reader: made the
        # INTERVAL it is (as DuckDB reads it from Arrow, for an empty input), which the Parquet IO
        # manager writes back as duration[us].
        # Every file's, not only the newest's: a column may be gone from it and still be in older files.
        units = duration_units(self.file_schemas.values() if self.file_schemas else [self.schema])
        durations = [
            _DURATION_AS_INTERVAL[unit].format(quote_identifier(name))
            for name, unit in units.items()
            if name in relation.columns
        ]
        return relation.project(f"* REPLACE ({', '.join(durations)})") if durations else relation

    def view(self, con: duckdb.DuckDBPyConnection, name: str) -> duckdb.DuckDBPyRelation:
        """Registers the input under ``name`` for use in SQL text, and returns it."""
        relation = self.relation(con)
        relation.create_view(name, replace=True)
        return relation


def _tune_for_remote_reads(con: duckdb.DuckDBPyConnection) -> None:
    """Prefetching back on, and at least the ``remote_threads`` of the DuckDBResource that made
    ``con`` (none: threads unchanged)."""
    con.execute("SET disable_parquet_prefetching = false")
    wanted = con.sql(f"SELECT getvariable('{REMOTE_THREADS_VARIABLE}')").fetchall()[0][0]
    current = con.sql("SELECT current_setting('threads')").fetchall()[0][0]
    if wanted and int(wanted) > int(current):
        con.execute(f"SET threads = {int(wanted)}")


def _kind(t: pa.DataType) -> str | None:
    """What a column's values mean, as far as reading files together goes (None: read as a common
    type, e.g. text with anything becomes text, which DuckDB and polars both do)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        return "an instant or date"
    if pa.types.is_time(t):
        return "a time of day"
    if pa.types.is_duration(t):
        return f"a duration in {t.unit}"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t):
        return "a number"
    return None


def duration_units(schemas: Iterable[pa.Schema]) -> dict[str, str]:
    """The duration columns of ``schemas`` and their unit (``check_columns_agree`` refuses two)."""
    return {f.name: f.type.unit for schema in schemas for f in schema if pa.types.is_duration(f.type)}


def check_columns_agree(what: str, schemas: Mapping[str, pa.Schema]) -> None:
    """Refuses files of one asset whose column means another kind of value in one than in another
    (a source's INT changed to DATETIME or TIME between bronze runs): read together by name,
    DuckDB and polars take one for the other — an instant as its microseconds, a duration as a
    plain number — or fail with a cast error."""
    kinds: dict[str, dict[str, str]] = {}  # column → kind → the first file with it
    for file, schema in schemas.items():
        for f in schema:
            kind = _kind(f.type)
            if kind is not None:
                kinds.setdefault(f.name, {}).setdefault(kind, file)
    for column, found in kinds.items():
        if len(found) > 1:
            (first, first_file), (other, other_file) = list(found.items())[:2]
            raise ValueError(
                f"{what}: column {column!r} is {first} in {first_file} but {other} in {other_file}; read "
                "together, one would be taken for the other. Rewrite the older files (for bronze: move "
                "the table's files away and run it with mode: full_refresh) or leave the column out "
                "(bronze: exclude_columns)"
            )


def record_batches(
    obj: Any,
    batch_rows: int = DEFAULT_ROW_GROUP_SIZE,
    row_group_bytes: int | None = None,
    row_bytes: int | None = None,
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Any supported output as (schema, stream of record batches), without collecting it whole.

    A DuckDB relation is read in batches of at most ``batch_rows`` that hold about an eighth of
    ``row_group_bytes`` (see ``relation_batch_rows``). Intervals (DuckDB's ``INTERVAL``, which
    Parquet cannot store) become ``duration[us]`` (see ``interval_as_duration``).
    """
    schema, batches = _record_batches(obj, batch_rows, row_group_bytes, row_bytes)
    intervals = [i for i, f in enumerate(schema) if f.type == pa.month_day_nano_interval()]
    if not intervals:
        return schema, batches
    for i in intervals:
        schema = schema.set(i, schema.field(i).with_type(pa.duration("us")))

    def converted() -> Iterator[pa.RecordBatch]:
        for batch in batches:
            columns = list(batch.columns)
            for i in intervals:
                columns[i] = interval_as_duration(columns[i], schema.field(i).name)
            yield pa.RecordBatch.from_arrays(columns, schema=schema)

    return schema, converted()


def interval_as_duration(array: pa.Array, name: str) -> pa.Array:
    """A month-day-nano interval array as ``duration[us]``: days of 86 400 s, exact to the
    microsecond (DuckDB's precision). Months have no fixed length: an interval with months fails,
    naming the column. A MySQL TIME (bronze's ``duration[us]``) round-trips through DuckDB this way."""
    n, offset = len(array), array.offset
    # Each value is 16 bytes: int32 months, int32 days (one little-endian int64), then int64 nanoseconds.
    words = pa.Array.from_buffers(pa.int64(), 2 * (n + offset), [None, array.buffers()[1]])
    pairs = pa.FixedSizeListArray.from_arrays(words, 2).slice(offset, n)
    head, nanos = pc.list_element(pairs, 0), pc.list_element(pairs, 1)
    valid = array.is_valid()
    months = pc.bit_wise_and(head, 0xFFFFFFFF)
    if pc.any(pc.and_(valid, pc.not_equal(months, 0))).as_py():
        raise ValueError(
            f"column {name!r}: an INTERVAL with months has no fixed length in seconds; "
            "give it as a number (e.g. epoch(...)) or in days"
        )
    days = pc.shift_right(head, 32)
    micros = pc.add(pc.multiply(days, 86_400_000_000), pc.divide(nanos, 1000))
    return pc.if_else(valid, micros, pa.scalar(None, pa.int64())).cast(pa.duration("us"))


def _record_batches(
    obj: Any, batch_rows: int, row_group_bytes: int | None, row_bytes: int | None
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    if loaded_instance(obj, "duckdb", "DuckDBPyRelation"):
        reader = obj.to_arrow_reader(relation_batch_rows(obj, batch_rows, row_group_bytes, row_bytes))
        return reader.schema, iter(reader)
    if loaded_instance(obj, "polars", "LazyFrame"):
        import polars as pl

        # The schema as DataFrame.to_arrow() gives it (large_string, not Schema.to_arrow()'s
        # string_view), so batches need no cast.
        schema = pl.DataFrame(schema=obj.collect_schema()).to_arrow().schema
        frames = obj.collect_batches(chunk_size=batch_rows)

        def lazy_batches() -> Iterator[pa.RecordBatch]:
            for frame in frames:
                yield from frame.to_arrow().to_batches()

        return schema, lazy_batches()
    if loaded_instance(obj, "polars", "DataFrame"):
        obj = obj.to_arrow()
    if isinstance(obj, pa.Table):
        return obj.schema, iter(obj.to_batches(max_chunksize=batch_rows))
    if isinstance(obj, pa.RecordBatchReader):
        return obj.schema, iter(obj)
    if isinstance(obj, pa.RecordBatch):
        return obj.schema, iter([obj])
    raise TypeError(
        f"cannot store {type(obj).__name__}: return a polars DataFrame/LazyFrame, a pyarrow Table or "
        "RecordBatchReader, or a DuckDB relation"
    )
