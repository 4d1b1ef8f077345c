"""The extraction engine: windows over a cursor, streamed in batches as Arrow record batches.

Column types come from the source's column metadata (SQLAlchemy reflection), never from
the data, so an all-NULL column keeps its type and DECIMAL/UNSIGNED values stay exact.
Rows are read through a server-side cursor in batches of the spec's size; each batch
becomes one Arrow record batch (one Parquet row group in bronze), so peak memory follows
the batch size, not the table size.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.dialects import mysql

from datalake.specs import CursorKind, Mode, NullCursorPolicy, TableSpec

RUN_ID_COLUMN = "_datalake_run_id"
EXTRACTED_AT_COLUMN = "_datalake_extracted_at"
ROW_SEQ_COLUMN = "_datalake_row_seq"
LINEAGE_FIELDS = (
    pa.field(RUN_ID_COLUMN, pa.string(), nullable=False),
    pa.field(EXTRACTED_AT_COLUMN, pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field(ROW_SEQ_COLUMN, pa.int64(), nullable=False),
)
UTC_TS = pa.timestamp("us", tz="UTC")


class ExtractionError(RuntimeError):
    pass


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

    @property
    def commits_watermark(self) -> bool:
        return self.kind in (WindowKind.INCREMENTAL, WindowKind.FULL_REFRESH)


# --- types -------------------------------------------------------------------------


def arrow_type(column: sa.Column[Any], where: str) -> pa.DataType:
    """Arrow type for a reflected column, from its declared SQL type."""
    t = column.type
    name = type(t).__name__.upper()
    unsigned = bool(getattr(t, "unsigned", False))
    if isinstance(t, mysql.TINYINT) and getattr(t, "display_width", None) == 1:
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
    raise ExtractionError(f"{where}: unsupported source type {t!r}")


def _select_expression(column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    # Raw text for JSON/SET: the driver-level deserialisers would change the value's form.
    if isinstance(column.type, (sa.JSON, mysql.SET)):
        return sa.type_coerce(column, sa.Text()).label(column.name)
    return column


def _converter(arrow: pa.DataType) -> Callable[[list[Any]], tuple[list[Any], int]]:
    """Cleans a column of driver values for pa.array; returns (values, zero_dates_nulled)."""
    if pa.types.is_timestamp(arrow) or pa.types.is_date(arrow):

        def dates(values: list[Any]) -> tuple[list[Any], int]:
            # PyMySQL hands back zero dates ('0000-00-00 ...') as strings: NULL them, and count.
            zero = 0
            for i, v in enumerate(values):
                if isinstance(v, str):
                    values[i] = None
                    zero += 1
            return values, zero

        return dates
    if pa.types.is_decimal(arrow):

        def decimals(values: list[Any]) -> tuple[list[Any], int]:
            for i, v in enumerate(values):
                if v is not None and not isinstance(v, Decimal):
                    values[i] = Decimal(str(v))
            return values, 0

        return decimals
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
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started


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
    # The resolved window, filled in once the read has started (hi is resolved then).
    resolved: dict[str, Any] = field(default_factory=dict)

    @property
    def watermark(self) -> Any:
        """The watermark this extraction commits (None: it commits none)."""
        if not self.window.commits_watermark:
            return None
        return self.resolved.get("hi")


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

    def oldest_open_transaction(self, conn: sa.Connection, log: Callable[[str], None]) -> dt.datetime | None:
        """Start of the oldest open InnoDB transaction, or None (unknown or none open)."""
        if self.name != "mysql":
            return None
        try:
            return conn.exec_driver_sql(
                "SELECT MIN(trx_started) FROM information_schema.innodb_trx "
                "WHERE trx_mysql_thread_id <> CONNECTION_ID()"
            ).scalar()
        except sqlalchemy.exc.DBAPIError as exc:
            log(f"cannot read information_schema.innodb_trx ({type(exc.orig).__name__}); hi is not capped")
            return None


def reflect(conn: sa.Connection, spec: TableSpec) -> sa.Table:
    try:
        table = sa.Table(spec.table, sa.MetaData(), schema=spec.source_schema, autoload_with=conn)
    except sqlalchemy.exc.NoSuchTableError:
        raise ExtractionError(f"{spec.qualified_name}: table not found in the source") from None
    names = set(table.columns.keys())
    for what, cols in (("primary_key", spec.primary_key), ("exclude_columns", spec.exclude_columns)):
        missing = [c for c in cols if c not in names]
        if missing:
            raise ExtractionError(
                f"{spec.qualified_name}: {what} column(s) {missing} not in the source table"
            )
    for col in (spec.cursor.column if spec.cursor else None, spec.date_column):
        if col is not None and col not in names:
            raise ExtractionError(f"{spec.qualified_name}: column {col!r} not in the source table")
    return table


def _utc_naive(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def extract(
    engine: sa.Engine,
    spec: TableSpec,
    window: Window,
    *,
    run_id: str,
    batch_size: int,
    lag: dt.timedelta = dt.timedelta(0),
    log: Callable[[str], None] = lambda _m: None,
    progress_every: float = 15.0,
    source: str = "",
) -> Extraction:
    """Plans the read and returns an Extraction whose batches stream from the source.

    The connection is opened by the first ``next()`` on the batches and closed when they are
    exhausted or the generator is closed, so a consumer that fails midway releases it.
    """
    extracted_at = dt.datetime.now(dt.UTC)
    conn = engine.connect()
    try:
        table = reflect(conn, spec)
        columns = [c for c in table.columns if c.name not in spec.exclude_columns]
        fields = [
            pa.field(c.name, arrow_type(c, f"{spec.qualified_name}.{c.name}"), nullable=c.nullable)
            for c in columns
        ]
    except BaseException:
        conn.close()
        raise
    schema = pa.schema([*fields, *LINEAGE_FIELDS])
    stats = ExtractionStats()
    extraction = Extraction(
        spec=spec, schema=schema, batches=iter(()), window=window, stats=stats, source=source
    )
    extraction.batches = _stream(
        conn,
        spec,
        table,
        columns,
        schema,
        window,
        extraction,
        run_id,
        extracted_at,
        batch_size,
        lag,
        log,
        progress_every,
    )
    return extraction


def _stream(
    conn: sa.Connection,
    spec: TableSpec,
    table: sa.Table,
    columns: Sequence[sa.Column[Any]],
    schema: pa.Schema,
    window: Window,
    extraction: Extraction,
    run_id: str,
    extracted_at: dt.datetime,
    batch_size: int,
    lag: dt.timedelta,
    log: Callable[[str], None],
    progress_every: float,
) -> Iterator[pa.RecordBatch]:
    dialect = SourceDialect(conn.dialect.name)
    stats = extraction.stats
    try:
        # Bounds travel as naive UTC, the form the source session (time_zone +00:00) compares in.
        lo, hi = _utc_naive(window.lo), _utc_naive(window.hi)
        if window.kind in (WindowKind.INCREMENTAL, WindowKind.FULL_REFRESH) and spec.cursor is not None:
            if spec.cursor.kind is CursorKind.TIMESTAMP:
                # hi comes from the source's clock before the snapshot opens: a row committed
                # later either carries a later cursor or belongs to a transaction open now,
                # which caps hi at its start so the next window reads it.
                hi = dialect.now(conn) - lag
                oldest = dialect.oldest_open_transaction(conn, log)
                if oldest is not None and oldest < hi:
                    log(f"hi capped at the oldest open transaction's start {oldest.isoformat()}")
                    hi = oldest
                if lo is not None and hi < lo:
                    hi = lo
            conn.commit()
            dialect.begin_snapshot(conn)
            if spec.cursor.kind is CursorKind.INTEGER:
                cursor_col = table.c[spec.cursor.column]
                top = conn.execute(sa.select(sa.func.max(cursor_col))).scalar()
                hi = lo if top is None else max(int(top) + 1, lo or 0)
        else:
            conn.commit()
            dialect.begin_snapshot(conn)
        extraction.resolved.update(lo=lo, hi=hi)

        stmt = sa.select(*[_select_expression(c) for c in columns])
        if window.kind is not WindowKind.SNAPSHOT and spec.mode is Mode.INCREMENTAL:
            column = table.c[window.column or spec.cursor.column]  # type: ignore[union-attr]
            bounds: list[sa.ColumnElement[bool]] = []
            if lo is not None:
                bounds.append(column >= lo)
            if hi is not None:
                bounds.append(column < hi)
            condition: sa.ColumnElement[bool] | None = sa.and_(*bounds) if bounds else None
            captures_nulls = (
                spec.null_cursor is NullCursorPolicy.CAPTURE
                and window.kind in (WindowKind.INCREMENTAL, WindowKind.EXPLICIT)
                and column.name == (spec.cursor.column if spec.cursor else None)
            )
            if condition is not None and captures_nulls:
                condition = sa.or_(condition, column.is_(None))
            if condition is not None:
                stmt = stmt.where(condition)
            order = [column, *[table.c[k] for k in spec.primary_key]]
        else:
            order = [table.c[k] for k in spec.primary_key]
        stmt = stmt.order_by(*order)

        converters = [_converter(f.type) for f in schema][: len(columns)]
        cursor_index = next(
            (i for i, c in enumerate(columns) if spec.cursor and c.name == spec.cursor.column), None
        )
        run_ids = None
        last_log = time.monotonic()
        result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(stmt)
        for rows in result.partitions(batch_size):
            n = len(rows)
            if run_ids is None or len(run_ids) != n:
                run_ids = pa.array([run_id] * n, pa.string())
            arrays: list[pa.Array] = []
            for i, values in enumerate(zip(*rows, strict=True)):
                cleaned, zero = converters[i](list(values))
                stats.zero_dates += zero
                if i == cursor_index:
                    stats.null_cursor_rows += sum(1 for v in cleaned if v is None)
                arrays.append(pa.array(cleaned, type=schema.field(i).type))
            arrays.append(run_ids)
            arrays.append(pa.array([extracted_at] * n, UTC_TS))
            arrays.append(pa.array(range(stats.rows, stats.rows + n), pa.int64()))
            stats.rows += n
            stats.batches += 1
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)
            now = time.monotonic()
            if now - last_log >= progress_every:
                last_log = now
                log(
                    f"{spec.qualified_name}: {stats.rows:,} rows in {stats.batches} batches, "
                    f"{stats.rows / max(stats.seconds, 1e-9):,.0f} rows/s"
                )
        stats.finished = time.monotonic()
    finally:
        try:
            conn.rollback()
        finally:
            conn.close()
