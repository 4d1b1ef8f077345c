"""The Arrow-native reader for MySQL/MariaDB: connectorx, with exact types restored.

connectorx streams Arrow record batches straight from the wire protocol (no Python row
objects), but its type mapping loses information: DECIMAL becomes decimal128(38,10) (silent
truncation, a panic above 28 digits), zero dates panic, TIME and TIMESTAMP depend on the
session. So each column is selected in a form the reader carries exactly, and restored to
the column's declared Arrow type (from the source's metadata, as in the row reader):

==========================  ================================================  ===================
MySQL type                  selected as                                        restored to
==========================  ================================================  ===================
DECIMAL(p,s), p>28 or s>10  ``CAST(c AS CHAR)`` (exact decimal text)           decimal128/256(p,s)
DECIMAL(p,s), otherwise     as is (decimal128(38,10), exact at that size)      decimal128(p,s)
BIGINT UNSIGNED             as is (connectorx carries u64 exactly)             uint64
BIT(n)                      ``CAST(c AS UNSIGNED)``                            uint64
DATETIME(fsp)               µs since 1970-01-01 (``TIMESTAMPDIFF``), or a      timestamp[us, UTC]
                            sentinel for zero/invalid dates
TIMESTAMP(fsp)              µs since the epoch (``UNIX_TIMESTAMP``: the        timestamp[us, UTC]
                            stored instant, whatever the session time zone)
DATE                        days since 1970-01-01 (``DATEDIFF``) or sentinel   date32
TIME(fsp)                   signed µs (``TIME_TO_SEC``; negative, > 24 h)      duration[us]
YEAR                        ``CAST(c AS SIGNED)``                              int16
ENUM, SET, JSON             ``CAST(c AS CHAR)``                                string
TINYINT(1)                  as is                                              bool
everything else             as is                                              declared type
==========================  ================================================  ===================

Zero dates become NULL and are counted. The statement runs with the session time zone set to
UTC for its duration (``SET STATEMENT`` on MariaDB, the ``SET_VAR`` hint on MySQL 8), so window
bounds on TIMESTAMP columns compare as UTC instants.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from datalake.extract import ExtractionError

# pyarrow.compute's kernels are generated at import time; type checkers cannot see them.
pc: Any = pyarrow.compute

if TYPE_CHECKING:
    from datalake.extract import Plan

_I64_SENTINEL = "(-9223372036854775807 - 1)"
_I32_SENTINEL = "(-2147483647 - 1)"
_EPOCH = "'1970-01-01 00:00:00'"


def _carried_exactly(arrow: pa.DataType) -> bool:
    """connectorx reads DECIMAL through a 96-bit decimal (28 digits) into decimal128(38,10)."""
    return arrow.precision <= 28 and arrow.scale <= 10


def _select_sql(column: sa.Column[Any], quoted: str, arrow: pa.DataType) -> str:
    t = column.type
    if pa.types.is_decimal(arrow) and not _carried_exactly(arrow):
        return f"CAST({quoted} AS CHAR)"
    if isinstance(t, mysql.BIT):
        return f"CAST({quoted} AS UNSIGNED)"
    if isinstance(t, mysql.TIMESTAMP):
        return f"IF({quoted} = 0, {_I64_SENTINEL}, CAST(UNIX_TIMESTAMP({quoted}) * 1000000 AS SIGNED))"
    if pa.types.is_timestamp(arrow):
        return (
            f"IFNULL(TIMESTAMPDIFF(MICROSECOND, {_EPOCH}, {quoted}), "
            f"IF({quoted} IS NULL, NULL, {_I64_SENTINEL}))"
        )
    if pa.types.is_date(arrow):
        return f"IFNULL(DATEDIFF({quoted}, {_EPOCH}), IF({quoted} IS NULL, NULL, {_I32_SENTINEL}))"
    if pa.types.is_duration(arrow):
        return f"CAST(TIME_TO_SEC({quoted}) * 1000000 AS SIGNED)"
    if isinstance(t, mysql.YEAR):
        return f"CAST({quoted} AS SIGNED)"
    if isinstance(t, (sa.JSON, sa.Enum, mysql.SET)):
        return f"CAST({quoted} AS CHAR)"
    return quoted


def _restore(array: pa.Array | pa.ChunkedArray, arrow: pa.DataType) -> tuple[pa.Array, int]:
    """The declared type from what the reader carried; returns (array, zero dates nulled)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    zero = 0
    if pa.types.is_timestamp(arrow) or pa.types.is_date(arrow):
        sentinel = -(2**63) if pa.types.is_timestamp(arrow) else -(2**31)
        is_zero = pc.equal(array, pa.scalar(sentinel, array.type))
        zero = pc.sum(is_zero).as_py() or 0
        if zero:
            array = pc.if_else(is_zero, pa.scalar(None, array.type), array)
        array = array.cast(pa.int64() if pa.types.is_timestamp(arrow) else pa.int32())
        return pc.cast(array, arrow), zero
    if pa.types.is_duration(arrow):
        return pc.cast(array.cast(pa.int64()), arrow), 0
    if pa.types.is_binary(arrow) and pa.types.is_large_binary(array.type):
        return array.cast(arrow), 0
    if array.type != arrow:
        return pc.cast(array, arrow), 0
    return array, 0


def statement(dialect: sa.Dialect, plan: Plan, lo: Any, hi: Any) -> str:
    """The SELECT for the window, with bounds rendered as literals (connectorx has no bind parameters).

    The bounds are values this code computed (datetimes, integers), rendered by SQLAlchemy's
    own literal processors for the dialect; identifiers are quoted by the dialect's preparer.
    """
    quote = dialect.identifier_preparer.quote
    columns = [
        sa.literal_column(_select_sql(c, quote(c.name), plan.schema.field(c.name).type)).label(c.name)
        for c in plan.columns
    ]
    stmt = sa.select(*columns).select_from(plan.table)
    condition = plan.where(lo, hi)
    if condition is not None:
        stmt = stmt.where(condition)
    sql = str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    server = getattr(dialect, "server_version_info", None) or ()
    if getattr(dialect, "is_mariadb", False):
        return f"SET STATEMENT time_zone = '+00:00' FOR {sql}"
    if server >= (8, 0):
        return sql.replace("SELECT ", "SELECT /*+ SET_VAR(time_zone = '+00:00') */ ", 1)
    return sql


def stream_arrow(
    url: str, dialect: sa.Dialect, plan: Plan, lo: Any, hi: Any, batch_size: int
) -> Iterator[tuple[list[pa.Array], int]]:
    import connectorx as cx

    sql = statement(dialect, plan, lo, hi)
    types = [plan.schema.field(c.name).type for c in plan.columns]
    password = _password(url)
    try:
        reader = cx.read_sql(url, sql, return_type="arrow_stream", batch_size=batch_size)
        for batch in reader:
            arrays: list[pa.Array] = []
            zero_dates = 0
            for i, arrow in enumerate(types):
                restored, zero = _restore(batch.column(i), arrow)
                arrays.append(restored)
                zero_dates += zero
            yield arrays, zero_dates
    except BaseException as exc:  # connectorx raises Rust panics as BaseException
        if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if password:
            message = message.replace(password, "***")
        raise ExtractionError(
            f"{plan.spec.qualified_name}: reading from the source failed: {message}"
        ) from None


def _password(url: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    secret = urlsplit(url).password
    return unquote(secret) if secret else None
