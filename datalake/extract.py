"""The extraction engine: windows over a cursor, streamed in batches as Arrow record batches.

Column types come from the source's column metadata (SQLAlchemy reflection), never from
the data, so an all-NULL column keeps its type and DECIMAL/UNSIGNED values stay exact.
Rows are streamed as Arrow record batches and written as Parquet row groups of the spec's batch
size, so peak memory follows the batch size, not the table size.

Two readers share the planning (window bounds, types, lineage):
- ``arrow`` (MySQL/MariaDB): connectorx's Arrow-native reader. It cannot carry every MySQL
  value exactly (wide DECIMALs, TIME beyond a day, zero dates), so the SELECT has the *server*
  hand just those over in a form it carries losslessly — decimal text, signed microseconds,
  zero dates as NULL on a guarded re-read — and ``datalake.arrow_reader`` restores the
  declared Arrow type exactly. See that module for the per-type mapping.
- ``rows`` (SQLAlchemy + PyMySQL server-side cursor, or the SQLite demo): the fallback, and
  the path for TLS connections.
"""

from __future__ import annotations

import array
import datetime as dt
import itertools
import os
import shutil
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from queue import Full, Queue
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute
import pyarrow.ipc
import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.dialects import mysql

from datalake.lake import FETCHES_PER_ROW_GROUP, delta_encodable, rows_per_fetch
from datalake.specs import CursorKind, Mode, NullCursorPolicy, TableSpec

if TYPE_CHECKING:
    from datalake.deletes import Reconciler

RUN_ID_COLUMN = "_datalake_run_id"
EXTRACTED_AT_COLUMN = "_datalake_extracted_at"
ROW_SEQ_COLUMN = "_datalake_row_seq"
# True on a tombstone: the key no longer exists in the source (hard delete).
DELETED_COLUMN = "_datalake_deleted"
LINEAGE_FIELDS = (
    pa.field(RUN_ID_COLUMN, pa.string(), nullable=False),
    pa.field(EXTRACTED_AT_COLUMN, pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field(ROW_SEQ_COLUMN, pa.int64(), nullable=False),
    pa.field(DELETED_COLUMN, pa.bool_(), nullable=False),
)
LINEAGE_COLUMNS = frozenset(f.name for f in LINEAGE_FIELDS)
UTC_TS = pa.timestamp("us", tz="UTC")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# pyarrow.compute's kernels are generated at import time; type checkers cannot see them.
pc: Any = pyarrow.compute
# Materialization metadata: the Arrow reader needed date guards (zero dates) for this table.
DATE_GUARDS_KEY = "datalake/date_guards"


# Rows per Arrow-reader fetch. connectorx decodes a fetch at a time ahead of the consumer, so
# what it holds follows the fetch size: 16k rows keep that to a few MB on wide tables (100k-row
# fetches peaked ~40 MB higher on the benchmark's CDR table, for ~6% less decoding CPU). The bronze
# writer groups fetches into row groups of the spec's batch size.
ARROW_FETCH_ROWS = 16_384
# The row width assumed for a table with unbounded columns (TEXT, BLOB, JSON) whose average row
# length the source does not know (no statistics yet).
UNKNOWN_WIDE_ROW_BYTES = 64 * 1024


class ExtractionError(RuntimeError):
    pass


class NotRetryable(ExtractionError):
    """The registry entry or the run's config disagrees with the source: another attempt cannot help."""


class NeedsDateGuards(ExtractionError):
    """The Arrow-native read met a zero date: the window must be read again with date guards."""


class WindowKind(StrEnum):
    INCREMENTAL = "incremental"  # [committed watermark, source now - lag); commits hi
    BACKFILL = "backfill"  # [D, D+1) over the date column; stateless
    FULL_REFRESH = "full_refresh"  # everything below hi; commits hi
    EXPLICIT = "explicit"  # an operator's [lo, hi); stateless
    SNAPSHOT = "snapshot"  # whole table; no cursor


@dataclass(frozen=True)
class Window:
    kind: WindowKind
    column: str | None = None
    lo: Any = None  # inclusive; None = unbounded
    hi: Any = None  # exclusive; None = resolved from the source at read time (incremental)
    # lo is an operator's set_watermark (not the committed one): it may not lie beyond the source.
    lo_from_operator: bool = False

    @property
    def commits_watermark(self) -> bool:
        return self.kind in (WindowKind.INCREMENTAL, WindowKind.FULL_REFRESH)


# --- types -------------------------------------------------------------------------


def is_tinyint1(type_: sa.types.TypeEngine[Any]) -> bool:
    """MySQL's BOOL/BOOLEAN, which is TINYINT(1) (the display width is all that sets it apart)."""
    return isinstance(type_, mysql.TINYINT) and getattr(type_, "display_width", None) == 1


def arrow_type(column: sa.Column[Any], where: str, tinyint1_as_bool: bool = True) -> pa.DataType:
    """Arrow type for a reflected column, from its declared SQL type (a TINYINT(1) is bool
    unless ``tinyint1_as_bool`` is false: then the number it holds)."""
    t = column.type
    name = type(t).__name__.upper()
    unsigned = bool(getattr(t, "unsigned", False))
    if is_tinyint1(t) and tinyint1_as_bool:
        return pa.bool_()
    if isinstance(t, mysql.BIT):
        return pa.uint64()
    if isinstance(t, mysql.YEAR):
        return pa.int16()
    if isinstance(t, sa.Boolean):
        return pa.bool_()
    if isinstance(t, sa.Integer):
        if isinstance(t, mysql.TINYINT):
            return pa.uint8() if unsigned else pa.int8()
        if isinstance(t, sa.SmallInteger):
            return pa.uint16() if unsigned else pa.int16()
        if isinstance(t, mysql.MEDIUMINT):
            return pa.uint32() if unsigned else pa.int32()
        if isinstance(t, sa.BigInteger):
            return pa.uint64() if unsigned else pa.int64()
        if "INT" in name and type(t).__module__.startswith("sqlalchemy.dialects.mysql"):
            return pa.uint32() if unsigned else pa.int32()
        return pa.int64()  # SQLite INTEGER is 64-bit
    if isinstance(t, sa.Float):
        return pa.float32() if name == "FLOAT" and t.precision is None else pa.float64()
    if isinstance(t, sa.Numeric):
        precision = t.precision or 38
        scale = t.scale if t.scale is not None else 10
        return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
    if isinstance(t, (sa.DateTime, mysql.TIMESTAMP)):
        return UTC_TS
    if isinstance(t, sa.Date):
        return pa.date32()
    if isinstance(t, sa.Time):
        # MySQL TIME is a signed duration (-838:59:59 .. 838:59:59), not a time of day.
        return pa.duration("us")
    if isinstance(t, (sa.JSON, sa.Enum, mysql.SET, sa.String)):
        return pa.string()
    if isinstance(
        t,
        (
            sa.LargeBinary,
            sa.BINARY,
            sa.VARBINARY,
            mysql.BLOB,
            mysql.TINYBLOB,
            mysql.MEDIUMBLOB,
            mysql.LONGBLOB,
        ),
    ):
        return pa.binary()
    raise NotRetryable(f"{where}: unsupported source type {t!r}")


def tinyint1_as_boolean(array: pa.Array, where: str) -> pa.Array:
    """A TINYINT(1) column's numbers as bool. MySQL stores any TINYINT in one (BOOL is only its
    alias): a value other than 0 or 1 would be lost as true, so it fails the read, naming the
    column and the registry key that reads its numbers instead."""
    if pa.types.is_boolean(array.type):
        return array
    # min_max, not comparisons with 0 and 1: making those scalars imports pandas (~50 MB).
    bounds = pc.min_max(array).as_py()
    if (bounds["min"] or 0) < 0 or (bounds["max"] or 0) > 1:
        found = sorted({v for v in array.to_pylist() if v not in (None, 0, 1)})
        shown = ", ".join(map(str, found[:5])) + (", …" if len(found) > 5 else "")
        table, column = where.rsplit(".", 1)
        raise NotRetryable(
            f"{where}: TINYINT(1), read as a boolean, holds {shown}, which true would lose; add "
            f"{column!r} to tinyint1_as_integer in the registry entry for {table} to read its numbers"
        )
    return pc.cast(array, pa.bool_())


def _select_expression(column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    # The driver's own values for JSON/SET (raw text) and TIME (a signed timedelta):
    # SQLAlchemy's result processors would parse JSON, make SET a Python set and turn TIME
    # into a time of day, which fails for negative values and values over 24 hours.
    # ENUM too: SQLAlchemy checks values against the labels it reflected, and MariaDB's SHOW
    # CREATE TABLE shows a 4-byte UTF-8 label (an emoji) as '?', so the real value is refused.
    # FLOAT/DOUBLE too: SQLAlchemy's MySQL types make the driver's float a Decimal rounded to 10
    # places (1e-11 became 0.0). And as a DOUBLE expression: the text protocol renders a FLOAT
    # column with 6 significant digits (16777216 became 16777200) and FLOAT(M,D)/DOUBLE(M,D) with
    # D decimals; a DOUBLE is rendered as stored (what the Arrow reader gets in binary).
    if isinstance(column.type, sa.Float):
        return sa.type_coerce(column * sa.literal_column("1e0"), sa.types.NullType()).label(column.name)
    if isinstance(column.type, (sa.JSON, mysql.SET, mysql.ENUM, sa.Time)):
        return sa.type_coerce(column, sa.types.NullType()).label(column.name)
    return column


def _civil_days(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date, for years Python's date lacks (0)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146097 + year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year - 719468


def _year_zero(text: str, as_date: bool) -> int | None:
    """A date (days) or DATETIME (microseconds since the epoch) the driver gave as text; None for a
    zero date (a month or day of 0)."""
    date_part, _, time_part = text.partition(" ")
    year, month, day = (int(p) for p in date_part.split("-"))
    if month == 0 or day == 0:
        return None
    days = _civil_days(year, month, day)
    if as_date:
        return days
    clock, _, fraction = (time_part or "00:00:00").partition(".")
    hours, minutes, seconds = (int(p) for p in clock.split(":"))
    micros = int((fraction + "000000")[:6])
    return ((days * 24 + hours) * 60 + minutes) * 60_000_000 + seconds * 1_000_000 + micros


_EPOCH_DATE = dt.date(1970, 1, 1)
_EPOCH = dt.datetime(1970, 1, 1)


def _epoch_units(value: Any, as_date: bool) -> int | None:
    """A driver's date/datetime (naive UTC) as days / microseconds since the epoch."""
    if value is None or isinstance(value, int):
        return value
    if as_date:
        return (value - _EPOCH_DATE).days
    return (value.replace(tzinfo=None) - _EPOCH) // dt.timedelta(microseconds=1)


def _converter(arrow: pa.DataType) -> Callable[[list[Any]], tuple[list[Any], int]]:
    """Cleans a column of driver values for pa.array; returns (values, zero_dates_nulled)."""
    if pa.types.is_timestamp(arrow) or pa.types.is_date(arrow):

        def dates(values: list[Any]) -> tuple[list[Any], int]:
            # PyMySQL hands back what Python's datetime cannot hold as strings: zero dates
            # ('0000-00-00 ...', a month or day of 0: NULLed, and counted) and dates of year 0
            # ('0000-01-01', legal in MariaDB: written as the Arrow reader reads them).
            zero, year_zero = 0, False
            for i, v in enumerate(values):
                if isinstance(v, str):
                    parsed = _year_zero(v, pa.types.is_date(arrow))
                    values[i] = parsed
                    zero += parsed is None
                    year_zero = year_zero or parsed is not None
            if year_zero:  # pa.array takes a column of one kind: all as days / microseconds
                values = [_epoch_units(v, pa.types.is_date(arrow)) for v in values]
            return values, zero

        return dates
    if pa.types.is_decimal(arrow):

        def decimals(values: list[Any]) -> tuple[list[Any], int]:
            for i, v in enumerate(values):
                if v is not None and not isinstance(v, Decimal):
                    values[i] = Decimal(str(v))
            return values, 0

        return decimals
    if pa.types.is_floating(arrow):

        def floats(values: list[Any]) -> tuple[list[Any], int]:
            # The driver's floats (see _select_expression); other dialects may hand back Decimal.
            return [None if v is None else float(v) for v in values], 0

        return floats
    if pa.types.is_boolean(arrow):

        def booleans(values: list[Any]) -> tuple[list[Any], int]:
            return [None if v is None else bool(v) for v in values], 0

        return booleans
    if pa.types.is_string(arrow):

        def strings(values: list[Any]) -> tuple[list[Any], int]:
            for i, v in enumerate(values):
                if v is not None and not isinstance(v, str):
                    values[i] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
            return values, 0

        return strings
    return lambda values: (values, 0)


# --- the extraction ----------------------------------------------------------------


@dataclass
class ExtractionStats:
    rows: int = 0
    batches: int = 0
    zero_dates: int = 0
    null_cursor_rows: int = 0
    # Passes over the window: 2 when a native read met a zero date and was read again guarded.
    passes: int = 1
    # Keys found deleted in the source by a delete reconciliation (None: none was run).
    deletes: int | None = None
    # Batches the writer was not ready for, parked on local disk (see Spill).
    spilled_batches: int = 0
    spilled_bytes: int = 0
    # Parallel streams the window was read in (see key_cuts).
    streams: int = 1
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def restart(self) -> None:
        """Counts from zero for a re-read of the same window (the clock keeps running)."""
        self.rows = self.batches = self.zero_dates = self.null_cursor_rows = 0
        self.spilled_batches = self.spilled_bytes = 0
        self.passes += 1

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started


# A column is dictionary-encoded when the first rows of its file hold fewer distinct values than
# this share of them; above it the dictionary costs more to build than it saves. Counting on the
# first ARROW_FETCH_ROWS rows instead of the whole first row group costs ~6x less (~50 ms a file
# on the benchmark's CDR table) and picks the same columns there but one that repeats only
# across 100k rows.
DICTIONARY_MAX_DISTINCT_SHARE = 0.5
# Integer-like columns (integers, times, decimals up to 18 digits) are delta-encoded without a
# dictionary, which costs far less to write: they get one only where their values repeat much
# more. Measured on the benchmark's CDR table (distinct shares in the sample: partner 0.003,
# customer 0.11, subscription 0.15, duration 0.19, bytes 0.30, cost 0.47): a dictionary on the
# customer or subscription made the file larger and the writer slower; on the other three it
# saved ~3% of the file for ~40% more writer CPU. With this share the writer uses ~15% less CPU
# for a 1.6% larger file.
DICTIONARY_MAX_DISTINCT_SHARE_INTEGER = 0.05
DICTIONARY_SAMPLE_ROWS = ARROW_FETCH_ROWS
# Columns whose values average more than this (documents, blobs) are never dictionary-encoded
# and not counted: counting hashes a copy of every sampled value (on 500 KB documents that copy
# was ~3x the row group, the read's peak), and a dictionary of them would save little.
DICTIONARY_MAX_VALUE_BYTES = 1024


def dictionary_columns(spec: TableSpec, first: pa.Table) -> list[str]:
    """The columns to dictionary-encode in one bronze file, chosen on its first rows.

    A dictionary over (nearly) unique values is pure cost: the writer hashes every value, then
    writes the values again in the dictionary page. Columns the spec makes unique (a one-column
    key, the cursor, the date column, the lineage sequence) are never encoded; any other column
    is encoded where its values repeat in the first rows (partner, call type, status …) and
    written plain where they hardly do (timestamps, free text). Measured on the benchmark's CDR
    table: ~30% less writer CPU and a ~10% smaller file than encoding every column that is not
    unique by the spec, with the same DuckDB and polars scan times.
    """
    unique = {ROW_SEQ_COLUMN, spec.cursor.column if spec.cursor else "", spec.date_column or ""}
    if len(spec.primary_key) == 1:  # one column of a composite key may well repeat
        unique.add(spec.primary_key[0])
    sample = first.slice(0, DICTIONARY_SAMPLE_ROWS)
    wide = DICTIONARY_MAX_VALUE_BYTES * sample.num_rows

    def repeats(name: str) -> bool:
        column = sample.column(name)
        share = (
            DICTIONARY_MAX_DISTINCT_SHARE_INTEGER
            if delta_encodable(column.type)
            else DICTIONARY_MAX_DISTINCT_SHARE
        )
        return column.nbytes <= wide and pc.count_distinct(column).as_py() < share * sample.num_rows

    return [
        name for name in sample.column_names if name not in unique and (not sample.num_rows or repeats(name))
    ]


@dataclass
class Extraction:
    """What a bronze asset returns: a stream of record batches plus what it read.

    The bronze IO manager consumes ``batches``; once they are exhausted, ``stats`` and the
    resolved ``window`` are final and go into the materialization's metadata.
    """

    spec: TableSpec
    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]
    window: Window
    stats: ExtractionStats
    source: str
    # "arrow" (connectorx + server-side casts) or "rows" (SQLAlchemy/PyMySQL, SQLite demo).
    reader: str = "rows"
    run_id: str = ""
    # Rows per Parquet row group: the spec's batch size; a row group also ends at batch_bytes of
    # Arrow data (0: no byte bound). The readers fetch smaller batches (see ARROW_FETCH_ROWS,
    # FETCHES_PER_ROW_GROUP) that the writer groups.
    batch_size: int = 0
    batch_bytes: int = 0
    # Rows per fetch the reader started with (the row reader adapts it to the rows it meets).
    fetch_rows: int = 0
    # Set for a delete reconciliation (see datalake/deletes.py): the IO manager streams the window's
    # batches through it, then writes its tombstones after them, in the same file.
    reconcile: Reconciler | None = None
    # The resolved window, filled in once the read has started (hi is resolved then).
    resolved: dict[str, Any] = field(default_factory=dict)
    # Arrow reader only: zero dates are nulled server-side (see datalake/arrow_reader.py).
    date_guards: bool = False
    # Opens a fresh batch stream over the resolved window (date_guards as given).
    reopen: Callable[[bool], Iterator[pa.RecordBatch]] | None = None

    def dictionary_columns(self, first: pa.Table) -> list[str]:
        return dictionary_columns(self.spec, first)

    def reread_with_date_guards(self) -> None:
        """After ``NeedsDateGuards``: the same window again, guarded; whatever was written is discarded."""
        if self.reopen is None or self.date_guards:
            raise ExtractionError(f"{self.spec.qualified_name}: cannot read the window again")
        self.stats.restart()
        self.date_guards = True
        self.batches = self.reopen(True)

    @property
    def over_cursor(self) -> bool:
        """Whether the window's bounds are over the cursor (not a backfill over the date column)."""
        cursor = self.spec.cursor
        return cursor is not None and (self.window.column or cursor.column) == cursor.column

    @property
    def watermark(self) -> Any:
        """The watermark this extraction commits (None: it commits none)."""
        if not self.window.commits_watermark:
            return None
        return self.resolved.get("hi")

    def metadata(self) -> dict[str, Any]:
        """What was read, for the materialization; complete once ``batches`` is exhausted.

        The watermark entry is not included: the bronze IO manager adds it, and only after
        the file is durably in the lake.
        """
        stats = self.stats

        from datalake.watermark import COMPLETE_UNTIL_KEY, SOURCE_KEY, encode_watermark

        def text(value: Any) -> str:
            return "" if value is None else encode_watermark(value)

        return {
            "datalake/window_kind": self.window.kind.value,
            "datalake/window_lo": text(self.resolved.get("lo")),
            "datalake/window_hi": text(self.resolved.get("hi")),
            # Committed with the watermark: what the freshness check measures the table's age by.
            **(
                {COMPLETE_UNTIL_KEY: text(self.resolved["as_of"])}
                if self.window.commits_watermark and self.resolved.get("as_of") is not None
                else {}
            ),
            "datalake/reader": self.reader,
            DATE_GUARDS_KEY: self.date_guards,
            "datalake/passes": stats.passes,
            "datalake/zero_dates_nulled": stats.zero_dates,
            "datalake/null_cursor_rows": stats.null_cursor_rows,
            # The rows read from the window's bounds: no delete tombstones (``dagster/row_count``
            # counts them), and over the cursor no NULL-cursor rows (NULL and zero dates, outside
            # every cursor window); a backfill over a separate date column holds those by date.
            "datalake/window_rows": stats.rows - (stats.null_cursor_rows if self.over_cursor else 0),
            "datalake/batches": stats.batches,
            "datalake/streams": stats.streams,
            "datalake/fetch_rows": self.fetch_rows,
            "datalake/spilled_batches": stats.spilled_batches,
            "datalake/spilled_bytes": stats.spilled_bytes,
            "datalake/seconds": round(stats.seconds, 3),
            "datalake/rows_per_second": round(stats.rows / max(stats.seconds, 1e-9)),
            SOURCE_KEY: self.source,
            **({"datalake/deletes_found": stats.deletes} if stats.deletes is not None else {}),
        }


@dataclass(frozen=True)
class SourceDialect:
    """What differs between MySQL and the embedded demo source."""

    name: str

    def begin_snapshot(self, conn: sa.Connection) -> None:
        if self.name == "mysql":
            # One consistent, read-only snapshot for the high-water mark and the rows.
            conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")

    def now(self, conn: sa.Connection) -> dt.datetime:
        if self.name == "mysql":
            value = conn.exec_driver_sql("SELECT NOW(6)").scalar_one()
        else:
            value = dt.datetime.fromisoformat(
                conn.exec_driver_sql("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')").scalar_one()
            )
        return value

    def table_facts(self, conn: sa.Connection, spec: TableSpec) -> tuple[int | None, bool, int | None]:
        """(the source's estimate of the average row length or None, whether it is a base table,
        its estimate of the table's rows or None).

        A view takes no index hint (MySQL refuses even an empty ``USE INDEX ()`` on one).
        """
        if self.name != "mysql":
            return None, False, None
        try:
            row = conn.execute(
                sa.text(
                    "SELECT AVG_ROW_LENGTH, TABLE_TYPE, TABLE_ROWS FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = :schema AND TABLE_NAME = :table"
                ),
                {"schema": spec.source_schema, "table": spec.table},
            ).first()
        except sqlalchemy.exc.DBAPIError:
            return None, False, None
        if row is None:
            return None, False, None
        return (
            (int(row[0]) if row[0] else None),
            row[1] == "BASE TABLE",
            (None if row[2] is None else int(row[2])),
        )

    def oldest_open_transaction(self, conn: sa.Connection, log: Callable[[str], None]) -> dt.datetime | None:
        """Start of the oldest open InnoDB transaction in UTC, or None (unknown or none open).

        ``trx_started`` is in the server's system time zone (its ``TZ``), not the session's: a
        server ahead of UTC would never cap ``hi`` (late commits lost), one behind would hold it
        back by hours.
        """
        if self.name != "mysql":
            return None
        try:
            # Only transactions that can still commit rows stamped before now: not read-only ones
            # (other extractions' snapshots, reports), nor idle ones that have written nothing —
            # their next statement starts after now, so its NOW() is later than hi. An idle pooled
            # BEGIN would otherwise hold every table's hi back for as long as it stays open.
            return conn.exec_driver_sql(
                "SELECT CONVERT_TZ(MIN(trx_started), 'SYSTEM', '+00:00') FROM information_schema.innodb_trx "
                "WHERE trx_mysql_thread_id <> CONNECTION_ID() AND trx_is_read_only = 0 "
                "AND (trx_rows_modified > 0 OR trx_rows_locked > 0 OR trx_query IS NOT NULL)"
            ).scalar()
        except sqlalchemy.exc.DBAPIError as exc:
            log(
                f"cannot read information_schema.innodb_trx ({type(exc.orig).__name__}: the source user "
                "lacks PROCESS); hi is not capped at open transactions, so a row committed more than the "
                "lag after its transaction began is never read (grant PROCESS, or raise the lag)"
            )
            return None


def reflect(conn: sa.Connection, spec: TableSpec) -> sa.Table:
    try:
        table = sa.Table(spec.table, sa.MetaData(), schema=spec.source_schema, autoload_with=conn)
    except sqlalchemy.exc.NoSuchTableError:
        raise NotRetryable(f"{spec.qualified_name}: table not found in the source") from None
    if any("``" in c.name for c in table.columns):
        # MySQL's reflection (SHOW CREATE TABLE) leaves a backtick in a column's name doubled, as it
        # is quoted there; the preparer would double it again and the column would not be found.
        columns = [
            sa.Column(c.name.replace("``", "`"), c.type, nullable=c.nullable, primary_key=c.primary_key)
            for c in table.columns
        ]
        table = sa.Table(spec.table, sa.MetaData(), *columns, schema=spec.source_schema)
    names = set(table.columns.keys())
    for what, cols in (
        ("primary_key", spec.primary_key),
        ("exclude_columns", spec.exclude_columns),
        ("tinyint1_as_integer", spec.tinyint1_as_integer),
    ):
        missing = [c for c in cols if c not in names]
        if missing:
            raise NotRetryable(f"{spec.qualified_name}: {what} column(s) {missing} not in the source table")
    for col in spec.tinyint1_as_integer:
        if not is_tinyint1(table.c[col].type):
            raise NotRetryable(
                f"{spec.qualified_name}: tinyint1_as_integer column {col!r} is {table.c[col].type}, "
                "not TINYINT(1) (only TINYINT(1) is read as a boolean)"
            )
    checks = [("date_column", spec.date_column, CursorKind.TIMESTAMP)]
    if spec.cursor is not None:
        checks.insert(0, ("cursor.column", spec.cursor.column, spec.cursor.kind))
    for field_name, col, kind in checks:
        if col is None:
            continue
        if col not in names:
            raise NotRetryable(f"{spec.qualified_name}: {field_name} {col!r} not in the source table")
        type_ = table.c[col].type
        temporal = isinstance(type_, (sa.DateTime, sa.Date))
        if not (isinstance(type_, sa.Integer) if kind is CursorKind.INTEGER else temporal):
            # A timestamp bound compared with an integer column is a number to MySQL ('2026-…' is 2026):
            # the run would read a few rows and every later window none, without an error.
            expected = (
                "an integer column" if kind is CursorKind.INTEGER else "a DATETIME, TIMESTAMP or DATE column"
            )
            what = f"cursor.kind {kind.value!r}" if field_name == "cursor.column" else "date_column"
            raise NotRetryable(
                f"{spec.qualified_name}: {field_name} {col!r} is {type_}, but {what} needs {expected}"
            )
    return table


def utc_naive(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


@dataclass(frozen=True)
class Plan:
    """What one extraction reads: the table, its columns and their Arrow types, the bounds."""

    spec: TableSpec
    table: sa.Table
    columns: tuple[sa.Column[Any], ...]
    schema: pa.Schema  # source columns + lineage
    window: Window
    # Estimated bytes per row, for sizing fetches (None: no estimate, and no unbounded columns).
    row_bytes: int | None = None
    # A MySQL base table (not a view): what may take an index hint.
    base_table: bool = False
    # The source's estimate of the table's rows (InnoDB's is approximate), where it has one.
    row_estimate: int | None = None

    @property
    def window_column(self) -> sa.Column[Any] | None:
        if self.window.kind is WindowKind.SNAPSHOT or self.spec.mode is Mode.SNAPSHOT:
            return None
        assert self.spec.cursor is not None
        return self.table.c[self.window.column or self.spec.cursor.column]

    def where(self, lo: Any, hi: Any) -> sa.ColumnElement[bool] | None:
        """[lo, hi) over the window column; NULL cursors too where the spec captures them."""
        column = self.window_column
        if column is None:
            return None
        bounds: list[sa.ColumnElement[bool]] = []
        if lo is not None:
            bounds.append(column >= lo)
        if hi is not None:
            bounds.append(column < hi)
        if not bounds:
            return None
        condition: sa.ColumnElement[bool] = sa.and_(*bounds)
        cursor = self.spec.cursor
        captures_nulls = (
            self.spec.null_cursor is NullCursorPolicy.CAPTURE
            and self.window.kind in (WindowKind.INCREMENTAL, WindowKind.EXPLICIT, WindowKind.FULL_REFRESH)
            and cursor is not None
            and column.name == cursor.column
        )
        if not captures_nulls or cursor is None:
            return condition
        return sa.or_(condition, outside_every_window(column, cursor.kind))

    def select(
        self,
        columns: Sequence[sa.ColumnElement[Any]],
        lo: Any,
        hi: Any,
        key_range: tuple[int | None, int | None] | None = None,
    ) -> sa.Select[Any]:
        """The window's SELECT of ``columns``; with ``key_range``, of the rows whose (integer)
        primary key is in [start, end) (None: unbounded), one stream of a split read.

        A window below the source's now with no lower bound (a first run, a full refresh) is
        the whole table but the newest rows: MySQL would still walk the cursor's index as a
        range (for an id cursor, the clustered primary key), which costs the server more than
        scanning the table (on the benchmark's 2M-row CDR table ~3% more CPU; on a shared host,
        the server's CPU is the extraction's). ``USE INDEX ()`` makes it the plain scan (of a base
        table; a view takes no hint).
        """
        stmt = sa.select(*columns).select_from(self.table)
        if key_range is not None:
            key = self.table.c[self.spec.primary_key[0]]
            start, end = key_range
            stmt = stmt.where(
                *([key >= start] if start is not None else []), *([key < end] if end is not None else [])
            )
        condition = self.where(lo, hi)
        if condition is None:
            return stmt
        stmt = stmt.where(condition)
        if (
            key_range is None  # a stream's key range is read through the key's index
            and self.base_table
            and lo is None
            and self.window.kind in (WindowKind.INCREMENTAL, WindowKind.FULL_REFRESH)
        ):
            stmt = stmt.with_hint(self.table, "USE INDEX ()", dialect_name="mysql")
        return stmt


def outside_every_window(column: sa.ColumnElement[Any], kind: CursorKind) -> sa.ColumnElement[bool]:
    """Rows whose cursor no window holds: NULL, and for a time cursor MySQL's zero dates.

    ``'0000-00-00'`` sorts below every ``lo`` and is not ``IS NULL`` in a NULLable column (bronze
    stores it as NULL); nothing before year 1000 is a real DATETIME.
    """
    if kind is CursorKind.TIMESTAMP:
        return sa.or_(column.is_(None), column < sa.literal("1000-01-01", sa.String()))
    return column.is_(None)


def resolve_bounds(
    conn: sa.Connection,
    plan: Plan,
    lag: dt.timedelta,
    log: Callable[[str], None],
    warn: Callable[[str], None] | None = None,
) -> tuple[Any, Any, dt.datetime | None]:
    """The window's [lo, hi) as naive UTC datetimes or integers, ``hi`` from the source, and the
    instant (naive UTC) up to which a committed window leaves the table complete in the lake.

    ``hi`` is fixed *before* the rows are read. Any transaction that commits afterwards was
    either open now — then ``hi`` is capped at its start, so its rows (whose cursor is set
    after it started) fall in the next window — or starts later, and then its cursor values
    are later than ``hi`` too. That is what makes at-least-once hold with late commits.
    """
    spec, window = plan.spec, plan.window
    lo, hi = utc_naive(window.lo), utc_naive(window.hi)
    if window.kind is WindowKind.SNAPSHOT or spec.cursor is None:
        return lo, hi, None
    dialect = SourceDialect(conn.dialect.name)
    now = dialect.now(conn)
    if window.lo_from_operator:
        _refuse_watermark_beyond(conn, plan, lo, now)
    cap = now - lag
    oldest = dialect.oldest_open_transaction(conn, warn or log)
    if oldest is not None and oldest < cap:
        log(f"{spec.qualified_name}: hi capped at the oldest open transaction's start {oldest.isoformat()}")
        cap = oldest
    over_ids = window.column == spec.cursor.column and spec.cursor.kind is CursorKind.INTEGER
    if window.kind in (WindowKind.BACKFILL, WindowKind.EXPLICIT):
        # A stateless window reaching into the present (a backfill of today, an explicit window
        # without an end) stops where an incremental run would: rows committed after the read in
        # the rest of it would be missing from it for good (its reconciliation check failed).
        safe = _newest_safe_id(conn, plan, cap) if over_ids else cap
        if safe is None:  # no id known to be safe: nothing
            safe = lo if lo is not None else _lowest_integer(plan.table.c[spec.cursor.column].type)
        if hi is None or hi > safe:
            hi = safe if lo is None or safe >= lo else lo
    elif spec.cursor.kind is CursorKind.TIMESTAMP:
        if lag < dt.timedelta(seconds=1) and dialect.name == "mysql":
            (warn or log)(
                f"{spec.qualified_name}: the extraction lag is {lag.total_seconds():g} s: a row stamped by "
                "NOW() (whole seconds, also in a DATETIME(6)) in this window's last second, after its "
                "hi, lands below the next window's start and is never read; set "
                "DATALAKE_EXTRACT_LAG_SECONDS to 1 or more"
            )
        if lo is not None:
            lo = _in_cursor_precision(lo, plan.table.c[spec.cursor.column].type, conn.dialect.name)
        hi = cap if lo is None or cap >= lo else lo
    else:
        newest = _newest_safe_id(conn, plan, cap)
        if newest is not None:
            hi = newest if lo is None else max(newest, lo)
        elif lo is not None:
            hi = lo
        else:
            # No row inserted before the cap (an empty or truncated table, or all its rows inside
            # the lag): no id is known to be safe, so the window reads nothing, yet it commits —
            # the column's lowest value, so a full refresh's reset takes effect and the next run
            # reads every row. (Without a hi, a truncated table kept its old watermark, and the
            # ids it hands out again from 1 were never read.)
            hi = _lowest_integer(plan.table.c[spec.cursor.column].type)
    conn.commit()
    # Everything stamped (inserted) before it is in the lake once this window commits: hi for a
    # time cursor (the cap, or lo when the cap lies below it), the cap for an id cursor.
    as_of = hi if spec.cursor.kind is CursorKind.TIMESTAMP and isinstance(hi, dt.datetime) else cap
    return lo, hi, as_of


def key_cuts(
    conn: sa.Connection, plan: Plan, lo: Any, hi: Any, streams: int, min_rows: int
) -> tuple[int, ...]:
    """Where the window's read is cut into ``streams`` parallel streams (none: one stream).

    A read is split on a single-column integer primary key into ranges that together hold every
    key (the first is open below, the last open above), so each row of the window is read by
    exactly one stream whatever the cuts. Each stream is a read of its own connection, like
    windows read one after another: what commits meanwhile falls in a later window, as ever.

    It is split only where it is known to be large, i.e. at least ``streams * min_rows``: a
    window over the key itself (an id cursor that is the key) by its ids, a read without a lower
    bound (a first run, a full refresh, a snapshot table) by the source's estimate of the table's
    rows. Any other window (an incremental one over a time cursor, a backfill day) is read in
    one stream, as is a view. The cuts are evenly spaced over the keys the window may hold.
    """
    spec = plan.spec
    if streams < 2 or not plan.base_table or len(spec.primary_key) != 1:
        return ()
    key = plan.table.c[spec.primary_key[0]]
    window_column = plan.window_column
    over_key = window_column is not None and window_column.name == key.name
    if not isinstance(key.type, sa.Integer) or (lo is not None and not over_key):
        return ()
    # The ends of the primary key: two lookups in its index.
    low, high = conn.execute(sa.select(sa.func.min(key), sa.func.max(key))).one()
    if low is None:
        return ()
    low, high = int(low), int(high) + 1
    estimate = plan.row_estimate
    if over_key:
        low, high = max(low, lo) if lo is not None else low, min(high, hi) if hi is not None else high
        estimate = high - low
    if estimate is None or estimate < streams * min_rows or high - low < streams:
        return ()
    return tuple(low + (high - low) * i // streams for i in range(1, streams))


def _newest_safe_id(conn: sa.Connection, plan: Plan, cap: dt.datetime) -> int | None:
    """1 + the newest id inserted before ``cap`` (None: no such row): every id below it is committed.

    Auto-increment ids are allocated at insert, in time order, and date_column is the insert
    time: the newest row inserted before the cap bounds the ids that are safe to read; an
    uncommitted insert started later holds a higher id. The cap is cut down to date_column's
    precision: a DATETIME of whole seconds (a DATE) stamps a row inserted after the cap in the same
    second (day) below it, and its id is above an open transaction's. (A DATE date_column holds a
    day's ids back until the next day.)
    """
    spec = plan.spec
    assert spec.cursor is not None
    cursor_col, date_col = plan.table.c[spec.cursor.column], plan.table.c[spec.window_column or ""]
    before = _in_cursor_precision(cap, date_col.type, conn.dialect.name)
    newest = conn.execute(
        sa.select(cursor_col).where(date_col < before).order_by(date_col.desc(), cursor_col.desc()).limit(1)
    ).scalar()
    return None if newest is None else int(newest) + 1


def _lowest_integer(type_: sa.types.TypeEngine[Any]) -> int:
    """The lowest value an integer column can hold (0 for MySQL's UNSIGNED; else BIGINT's)."""
    return 0 if getattr(type_, "unsigned", False) else -(2**63)


def _in_cursor_precision(value: dt.datetime, type_: sa.types.TypeEngine[Any], dialect: str) -> dt.datetime:
    """``value`` cut down to what the cursor column can hold.

    ``hi`` is the source's clock to the microsecond; a DATETIME of whole seconds (or a DATE) stamps
    a row written in the same second (day) after it *below* it. A window starting at the previous
    ``hi`` would never read that row, so a window starts at the previous ``hi`` cut down to the
    column's precision: it reads the boundary second (day) again — duplicates silver removes, where
    cutting ``hi`` instead would hold a DATE cursor's rows back until the next day."""
    if dialect != "mysql":
        return value
    if isinstance(type_, sa.DateTime):
        step = 10 ** (6 - min(6, int(getattr(type_, "fsp", None) or 0)))
        return value.replace(microsecond=value.microsecond // step * step)
    if isinstance(type_, sa.Date):
        return dt.datetime.combine(value.date(), dt.time())
    return value


def _refuse_watermark_beyond(conn: sa.Connection, plan: Plan, lo: Any, now: dt.datetime) -> None:
    """An operator's set_watermark beyond the source (a typo: 2204 for 2024) would be committed as
    the next run's start, and every run after it would read nothing until the source got there."""
    spec = plan.spec
    assert spec.cursor is not None
    if spec.cursor.kind is CursorKind.TIMESTAMP:
        beyond, limit = lo > now, f"the source's clock ({now.isoformat()} UTC)"
    else:
        newest = conn.execute(sa.select(sa.func.max(plan.table.c[spec.cursor.column]))).scalar()
        beyond, limit = lo > (0 if newest is None else int(newest)) + 1, f"the newest id + 1 ({newest})"
    if beyond:
        raise NotRetryable(
            f"{spec.qualified_name}: set_watermark {lo} is beyond {limit}; committed, it would stop "
            "ingestion until the source reaches it"
        )


def plan_extraction(conn: sa.Connection, spec: TableSpec, window: Window) -> Plan:
    table = reflect(conn, spec)
    columns = tuple(c for c in table.columns if c.name not in spec.exclude_columns)
    fields = [
        # Only keys are NOT NULL in bronze: delete tombstones carry NULLs in every other column.
        pa.field(
            c.name,
            arrow_type(c, f"{spec.qualified_name}.{c.name}", c.name not in spec.tinyint1_as_integer),
            nullable=c.name not in spec.primary_key,
        )
        for c in columns
    ]
    average, base_table, row_estimate = SourceDialect(conn.dialect.name).table_facts(conn, spec)
    row_bytes = _row_bytes(average, columns)
    return Plan(
        spec=spec,
        table=table,
        columns=columns,
        schema=pa.schema([*fields, *LINEAGE_FIELDS]),
        window=window,
        row_bytes=row_bytes,
        base_table=base_table,
        row_estimate=row_estimate,
    )


def _unbounded(type_: sa.types.TypeEngine[Any]) -> bool:
    """TEXT, BLOB (strings and binaries without a declared length) and JSON: rows of any width."""
    return isinstance(type_, sa.JSON) or getattr(type_, "length", 0) is None


def _row_bytes(average: int | None, columns: tuple[sa.Column[Any], ...]) -> int | None:
    """The width of a row as read, for sizing fetches.

    The source's average covers every column of the table, excluded ones too (a blob left out
    by ``exclude_columns`` would shrink every fetch to a few rows); where all extracted columns
    have a declared size, their widest row bounds it. With TEXT, BLOB or JSON among them and no
    average known, a row is taken to be UNKNOWN_WIDE_ROW_BYTES wide.
    """
    if any(_unbounded(c.type) for c in columns):
        return average or UNKNOWN_WIDE_ROW_BYTES
    # Declared sizes: characters at up to 4 bytes (utf8mb4), anything else at most 32 bytes.
    widest = sum(4 * int(getattr(c.type, "length", 0) or 0) or 32 for c in columns)
    return min(average, widest) if average else None


def extract(
    engine: sa.Engine,
    spec: TableSpec,
    window: Window,
    *,
    run_id: str,
    batch_size: int,
    batch_bytes: int = 0,
    lag: dt.timedelta = dt.timedelta(0),
    log: Callable[[str], None] = lambda _m: None,
    warn: Callable[[str], None] | None = None,
    progress_every: float = 15.0,
    source: str = "",
    arrow_url: Callable[[sa.Connection], str] | None = None,
    reconcile_deletes: bool = False,
    date_guards: bool = False,
    streams: int = 1,
    stream_min_rows: int = 0,
) -> Extraction:
    """Plans the read and returns an Extraction whose batches stream from the source.

    With ``arrow_url`` (a MySQL source that connectorx can reach) the Arrow-native reader
    streams the rows; otherwise the SQLAlchemy row reader does. Nothing is read from the
    table until the batches are iterated; the window's ``hi`` is resolved then, too. The Arrow reader reads a large window in up to
    ``streams`` parallel streams of at least ``stream_min_rows`` rows each (see ``key_cuts``).
    """
    with engine.connect() as conn:
        plan = plan_extraction(conn, spec, window)
    stats = ExtractionStats()
    fetch_bytes = batch_bytes // FETCHES_PER_ROW_GROUP
    limit = min(batch_size, ARROW_FETCH_ROWS) if arrow_url is not None else batch_size
    extraction = Extraction(
        spec=spec,
        schema=plan.schema,
        batches=iter(()),
        window=window,
        stats=stats,
        source=source,
        reader="arrow" if arrow_url is not None else "rows",
        run_id=run_id,
        batch_size=batch_size,
        batch_bytes=batch_bytes,
        fetch_rows=rows_per_fetch(limit, fetch_bytes, plan.row_bytes),
    )
    lineage = Lineage(run_id=run_id, extracted_at=dt.datetime.now(dt.UTC), rows=extraction.fetch_rows)

    def batches(guard_dates: bool) -> Iterator[pa.RecordBatch]:
        with engine.connect() as conn:
            if "hi" in extraction.resolved:  # a re-read: the very same window
                lo, hi = extraction.resolved["lo"], extraction.resolved["hi"]
            else:
                lo, hi, as_of = resolve_bounds(conn, plan, lag, log, warn)
                extraction.resolved.update(lo=lo, hi=hi, as_of=as_of)
            if arrow_url is not None:
                from datalake.arrow_reader import stream_arrow

                if "cuts" not in extraction.resolved:  # a re-read keeps them
                    extraction.resolved["cuts"] = key_cuts(conn, plan, lo, hi, streams, stream_min_rows)
                cuts = extraction.resolved["cuts"]
                if cuts:
                    log(
                        f"{spec.qualified_name}: reading in {len(cuts) + 1} streams, "
                        f"cut on {spec.primary_key[0]} at {', '.join(map(str, cuts))}"
                    )
                stats.streams = len(cuts) + 1
                url = arrow_url(conn)  # TLS as this connection's, where it was negotiated
                conn.close()
                stream = stream_arrow(
                    url,
                    conn.dialect,
                    plan,
                    lo,
                    hi,
                    extraction.fetch_rows,
                    stats,
                    guard_dates=guard_dates,
                    cuts=cuts,
                )
            else:
                stream = stream_rows(conn, plan, lo, hi, batch_size, fetch_bytes, extraction.fetch_rows)
            last_log = time.monotonic()
            for columns, zero_dates in stream:
                stats.zero_dates += zero_dates
                batch = lineage.attach(plan.schema, columns, stats.rows)
                if spec.cursor is not None and spec.cursor.column in plan.schema.names:
                    stats.null_cursor_rows += batch.column(spec.cursor.column).null_count
                stats.rows += batch.num_rows
                stats.batches += 1
                yield batch
                if time.monotonic() - last_log >= progress_every:
                    last_log = time.monotonic()
                    log(
                        f"{spec.qualified_name}: {stats.rows:,} rows in {stats.batches} batches, "
                        f"{stats.rows / max(stats.seconds, 1e-9):,.0f} rows/s"
                    )
        stats.finished = time.monotonic()

    # The Arrow reader is paced in the writer's thread (see Paced); the row reader reads ahead in its own.
    extraction.reopen = (
        batches if arrow_url is not None else lambda guard: prefetch(batches(guard), READ_AHEAD_BATCHES)
    )
    extraction.date_guards = date_guards and arrow_url is not None
    extraction.batches = extraction.reopen(extraction.date_guards)
    if reconcile_deletes:
        from datalake.deletes import Reconciler

        extraction.reconcile = Reconciler(engine, extraction, batch_size)
    return extraction


_DONE = object()
# Batches a reader may hold in memory ahead of the writer. The row reader then waits; the Arrow
# reader's further batches wait on local disk (see Paced).
READ_AHEAD_BATCHES = 4


@dataclass(frozen=True)
class _Spilled:
    path: str


SPILL_PREFIX = "datalake-spill-"
# A spill directory left by a process that no longer exists (killed with SIGKILL, say) and
# untouched this long is removed by the next extraction that spills.
SPILL_STALE_SECONDS = 600


_SPILL_COUNT = threading.Lock()


class Spill:
    """Batches the writer is not ready for yet, on local disk: one Arrow IPC file each, in order.

    The files live in a temporary directory under ``TMPDIR`` (keep that on disk, not tmpfs),
    named after the process, and are removed as they are read and when the extraction ends. A
    killed run cannot remove its own: the next spill sweeps directories whose process is gone.
    """

    def __init__(self, stats: ExtractionStats):
        self.stats = stats
        self.directory: str | None = None
        self.count = 0

    def put(self, batch: pa.RecordBatch) -> _Spilled:
        if self.directory is None:
            sweep_stale_spills()
            self.directory = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-")
        path = os.path.join(self.directory, f"{self.count:09d}.arrow")
        self.count += 1
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        with _SPILL_COUNT:  # the streams of a split read spill from their own threads
            self.stats.spilled_batches += 1
            self.stats.spilled_bytes += batch.nbytes
        return _Spilled(path)

    @staticmethod
    def take(item: _Spilled) -> pa.RecordBatch:
        with pa.OSFile(item.path) as source:
            batch = pa.ipc.open_stream(source).read_next_batch()  # copied into memory
        os.remove(item.path)
        return batch

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def sweep_stale_spills() -> None:
    """Removes spill directories of processes that no longer exist, once untouched a while."""
    root = tempfile.gettempdir()
    now = time.time()
    for name in os.listdir(root):
        pid = name.removeprefix(SPILL_PREFIX).split("-", 1)[0]
        if not name.startswith(SPILL_PREFIX) or not pid.isdigit() or _alive(int(pid)):
            continue
        path = os.path.join(root, name)
        try:
            if now - os.stat(path).st_mtime < SPILL_STALE_SECONDS:
                continue
        except FileNotFoundError:
            continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


# A pull from the Arrow reader that returns within this time found a batch already decoded.
# (Decoding a fetch of ARROW_FETCH_ROWS rows takes milliseconds.)
READY_SECONDS = 0.001
# When no pull has had to wait for this long, the reader is ahead of the writer: what it has
# decoded is drained from its channel then (and beyond READ_AHEAD_BATCHES, spilled).
CAUGHT_UP_SECONDS = 0.1


class Paced:
    """A source that cannot be paused (connectorx), read in the writer's own thread, bounded.

    connectorx decodes in its own thread into an unbounded channel, and its iterator holds the
    GIL while it waits for the next batch. Read from a background thread, that wait locks the
    writer out of the interpreter between its native calls: measured on the benchmark, the
    extraction was ~25% slower and the writer fell behind. So the writer's thread pulls the
    batches itself, as connectorx's own loop does, and decoding overlaps writing.

    What keeps memory bounded when the writer is the slower side: a pull that has to wait shows
    the channel empty (the reader is caught up). When none has for ``CAUGHT_UP_SECONDS`` (a slow
    upload, a busy CPU), a watchdog thread pulls everything the channel holds, until a pull has
    to wait; batches beyond ``depth`` wait on local disk (``Spill``) and are read back in order.
    So memory holds ``depth`` batches plus what the source decodes in about
    ``CAUGHT_UP_SECONDS``. Errors surface at the batch where they happened; a consumer that
    stops early closes the source and removes the spill.
    """

    def __init__(self, source: Iterator[pa.RecordBatch], depth: int, spill: Spill):
        self.source, self.depth, self.spill = source, depth, spill
        self.lock = threading.Lock()  # one thread pulls at a time; guards what follows
        self.pending: deque[pa.RecordBatch | _Spilled] = deque()
        self.in_memory = 0
        self.end: Any = None  # _DONE or the source's error, once met
        self.caught_up_at = time.monotonic()  # the last pull that had to wait

    def _pull(self) -> tuple[Any, bool]:
        """The next batch (or the end, or the error) and whether the pull had to wait for it."""
        started = time.perf_counter()
        try:
            item: Any = next(self.source)
        except StopIteration:
            item = _DONE
        except BaseException as exc:  # handed to the writer in order
            item = exc
        waited = time.perf_counter() - started >= READY_SECONDS
        if waited:
            self.caught_up_at = time.monotonic()
        return item, waited

    def _drain(self) -> None:
        """Pulls what the source holds decoded, until a pull has to wait."""
        while self.end is None:
            item, waited = self._pull()
            if item is _DONE or isinstance(item, BaseException):
                self.end = item
            elif self.in_memory < self.depth:
                self.pending.append(item)
                self.in_memory += 1
            else:
                self.pending.append(self.spill.put(item))
            if waited:
                return

    def _take(self) -> Any:
        with self.lock:
            if not self.pending:
                return self.end if self.end is not None else self._pull()[0]
            item = self.pending.popleft()
            if isinstance(item, _Spilled):
                return Spill.take(item)
            self.in_memory -= 1
            return item

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(CAUGHT_UP_SECONDS / 2):
            if time.monotonic() - self.caught_up_at < CAUGHT_UP_SECONDS:
                continue
            with self.lock:
                if time.monotonic() - self.caught_up_at >= CAUGHT_UP_SECONDS and not stop.is_set():
                    self._drain()

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        stop = threading.Event()
        watchdog = threading.Thread(target=self._watch, args=(stop,), name="bronze-drain", daemon=True)
        watchdog.start()
        try:
            yield from _handed_out(self._take)
        finally:
            stop.set()
            watchdog.join()
            with self.lock:
                close_source(self.source)
                self.spill.close()


def prefetch(source: Iterator[pa.RecordBatch], depth: int) -> Iterator[pa.RecordBatch]:
    """Reads ``source`` in a background thread, at most ``depth`` batches ahead.

    For a source that can be paused and does Python work per row (the row reader's server-side
    cursor): the reader and the Parquet writer, which releases the GIL for its heavy part,
    overlap instead of alternating. Errors surface in the consumer at the batch where they
    happened; a consumer that stops early stops the reader too.
    """
    queue: Queue[Any] = Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.2)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not hand_over(item):
                    break
        except BaseException as exc:  # handed to the consumer
            hand_over(exc)
            return
        finally:
            if stop.is_set():
                close_source(source)
        hand_over(_DONE)

    thread = threading.Thread(target=produce, name="bronze-reader", daemon=True)
    thread.start()
    try:
        yield from _handed_out(queue.get)
    finally:
        stop.set()
        thread.join(timeout=30)


def _handed_out(take: Callable[[], Any]) -> Iterator[pa.RecordBatch]:
    """The batches ``take`` hands over, until the end; a source's error is raised where it came."""
    while True:
        item = take()
        if item is _DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def close_source(source: object) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


def _fixed_width(type_: pa.DataType, n: int, values: bytes) -> pa.Array:
    """An array straight from its bytes (no Python values converted, see Lineage)."""
    return pa.Array.from_buffers(type_, n, [None, pa.py_buffer(values)])


def string_array(values: Sequence[str]) -> pa.Array:
    """A string array straight from its bytes (``pa.array`` of Python strings imports pandas, see Lineage)."""
    encoded = [v.encode() for v in values]
    offsets = array.array("i", [0, *itertools.accumulate(len(b) for b in encoded)])
    return pa.Array.from_buffers(
        pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(encoded))]
    )


class Lineage:
    """The lineage columns of one run's batches: run id, extraction time, row sequence, tombstone flag.

    They are built once, when the run is planned, at the longest batch length, and each batch
    takes zero-copy slices: the row group the writer buffers holds one copy of the run id (36
    bytes a row) instead of one per batch. They are built from raw buffers, never from Python
    values: converting a Python value makes pyarrow import pandas wherever it is installed,
    which cost a bronze run ~1 s and ~60 MB in the benchmark's environment.
    """

    def __init__(self, run_id: str, extracted_at: dt.datetime, rows: int):
        self.run_id = run_id
        self.extracted_at = extracted_at
        self._build(rows)

    def _build(self, rows: int) -> None:
        self.rows = rows
        text = self.run_id.encode()
        offsets = (
            array.array("i", range(0, len(text) * (rows + 1), len(text)))
            if text
            else array.array("i", [0]) * (rows + 1)
        )
        self._run_id = pa.Array.from_buffers(
            pa.string(), rows, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(text * rows)]
        )
        micros = (self.extracted_at - EPOCH) // dt.timedelta(microseconds=1)
        self._extracted_at = _fixed_width(UTC_TS, rows, struct.pack("<q", micros) * rows)
        self._sequence = _fixed_width(pa.int64(), rows, array.array("q", range(rows)).tobytes())
        self._live = _fixed_width(pa.bool_(), rows, bytes((rows + 7) // 8))  # all False

    def attach(self, schema: pa.Schema, columns: list[pa.Array], first_seq: int) -> pa.RecordBatch:
        n = len(columns[0]) if columns else 0
        if n > self.rows:  # not with the readers here (their batches are at most the batch size)
            self._build(n)
        sequence = self._sequence.slice(0, n)
        if first_seq:
            sequence = pc.add(sequence, _fixed_width(pa.int64(), 1, struct.pack("<q", first_seq))[0])
        extra = [self._run_id.slice(0, n), self._extracted_at.slice(0, n), sequence, self._live.slice(0, n)]
        return pa.RecordBatch.from_arrays([*columns, *extra], schema=schema)


def stream_rows(
    conn: sa.Connection,
    plan: Plan,
    lo: Any,
    hi: Any,
    batch_size: int,
    fetch_bytes: int = 0,
    first_fetch: int | None = None,
) -> Iterator[tuple[list[pa.Array], int]]:
    """The row reader: a server-side cursor through SQLAlchemy; Python values → Arrow arrays.

    Fetches ``first_fetch`` rows (default: the batch size), then as many as make about
    ``fetch_bytes`` of Arrow data at the width of the rows read so far (0: always the batch size).
    The server-side cursor hands over exactly the rows fetched, so wide rows never pile up.
    """
    dialect = SourceDialect(conn.dialect.name)
    try:
        dialect.begin_snapshot(conn)
        stmt = plan.select([_select_expression(c) for c in plan.columns], lo, hi)
        converters = [_converter(f.type) for f in plan.schema][: len(plan.columns)]
        types = [plan.schema.field(i).type for i in range(len(plan.columns))]
        # TINYINT(1) read as bool: its numbers, checked (see tinyint1_as_boolean).
        checked = {
            i: f"{plan.spec.qualified_name}.{c.name}"
            for i, c in enumerate(plan.columns)
            if is_tinyint1(c.type) and pa.types.is_boolean(types[i])
        }
        result = conn.execution_options(stream_results=True).execute(stmt)
        size = first_fetch or batch_size
        while rows := result.fetchmany(size):
            arrays: list[pa.Array] = []
            zero_dates = 0
            for i, values in enumerate(zip(*rows, strict=True)):
                if i in checked:
                    arrays.append(tinyint1_as_boolean(pa.array(values, type=pa.int16()), checked[i]))
                    continue
                cleaned, zero = converters[i](list(values))
                zero_dates += zero
                arrays.append(pa.array(cleaned, type=types[i]))
            yield arrays, zero_dates
            size = rows_per_fetch(batch_size, fetch_bytes, -(-sum(a.nbytes for a in arrays) // len(rows)))
    finally:
        conn.rollback()
