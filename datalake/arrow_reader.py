"""The Arrow-native reader for MySQL/MariaDB: connectorx, with exact types restored.

connectorx streams Arrow record batches straight from the wire protocol (no Python row
objects), but its type mapping loses information: DECIMAL becomes decimal128(38,10) (silent
truncation, a panic above 28 digits), zero dates panic, TIME becomes a time of day. So the few
columns it cannot carry are selected in a form it carries exactly, and every column is restored
to its declared Arrow type (from the source's metadata, as in the row reader). Everything else
is read natively: a server-side expression costs MariaDB CPU on every row, which on a shared
host is the extraction's bottleneck.

==========================  ================================================  ===================
MySQL type                  selected as                                        restored to
==========================  ================================================  ===================
DECIMAL(p,s), p>28 or s>10  ``CAST(c AS CHAR)`` (exact decimal text)           decimal128/256(p,s)
DECIMAL(p,s), otherwise     as is (decimal128(38,10), exact at that size)      decimal128(p,s)
BIGINT UNSIGNED             as is (connectorx carries u64 exactly)             uint64
BIT(n)                      ``CAST(c AS UNSIGNED)``                            uint64
ENUM                        its index (``c+0``), where the labels are known     string (the label)
                            exactly (below); otherwise as is
DATETIME, DATE, TIMESTAMP   as is; with date guards (below), NULL where the    timestamp[us, UTC],
                            month or day is zero                               date32
TIME(fsp)                   signed µs (``TIME_TO_SEC``; negative, > 24 h)      duration[us]
JSON                        ``CAST(c AS CHAR)`` (MySQL 8 sends binary JSON)    string
TINYINT(1)                  as is                                              bool
everything else             as is                                              declared type
==========================  ================================================  ===================

An ENUM read as its label costs connectorx a string allocation and a UTF-8 check per value; its
index costs neither (on the benchmark's CDR table: ~0.1 s less client CPU per 2M rows, the same
server CPU), and the label is then looked up in the column's declared labels. Those come from
reflection, i.e. ``SHOW CREATE TABLE``, which MariaDB renders in a 3-byte charset: a label
outside it (an emoji) shows as ``?``. A column with a label containing ``?`` or a backslash
(whose escaping reflection may not undo) is read as its label instead. Index 0 is MySQL's
invalid-value ``''``.

Zero dates (``0000-00-00``, ``2024-00-10`` …, legal in legacy SQL modes) are the one value a
native date read cannot carry; connectorx panics on them. The first read is native; if it meets
a zero date it raises ``NeedsDateGuards`` and the caller discards what it wrote and reads the
same window again *with date guards*: each date column becomes ``IF(MONTH(c) = 0 OR
DAYOFMONTH(c) = 0, NULL, c)`` and one extra column counts the zero dates nulled per row. The
materialization records that the table needed guards, so later runs start guarded.

The statement runs with the session time zone set to UTC for its duration (``SET STATEMENT`` on
MariaDB, the ``SET_VAR`` hint on MySQL 8), so TIMESTAMP values arrive as UTC instants and window
bounds on TIMESTAMP columns compare as UTC instants.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from datalake.extract import (
    READ_AHEAD_BATCHES,
    ExtractionError,
    NeedsDateGuards,
    Paced,
    Spill,
    close_source,
    string_array,
    tinyint1_as_boolean,
)

# pyarrow.compute's kernels are generated at import time; type checkers cannot see them.
pc: Any = pyarrow.compute

if TYPE_CHECKING:
    from datalake.extract import ExtractionStats, Plan

ZERO_DATES_COLUMN = "_datalake_zero_dates"


def _carried_exactly(arrow: pa.DataType) -> bool:
    """connectorx reads DECIMAL through a 96-bit decimal (28 digits) into decimal128(38,10).

    Every value is rescaled to 10 places within those 28 digits, so at most 18 may be left of
    the point: DECIMAL(19,0) or (20,8) fails the read on its first value that large.
    """
    return arrow.precision - arrow.scale <= 18 and arrow.scale <= 10


def enum_labels(column: sa.Column[Any]) -> list[str] | None:
    """The labels by ENUM index (0: the invalid value ``''``), where reflection gives them exactly."""
    t = column.type
    if not isinstance(t, mysql.ENUM):
        return None
    labels = list(t.enums)
    if any("?" in label or "\\" in label for label in labels):
        return None
    return ["", *labels]


def _is_date(arrow: pa.DataType) -> bool:
    return pa.types.is_timestamp(arrow) or pa.types.is_date(arrow)


def _zero_date(quoted: str) -> str:
    return f"(MONTH({quoted}) = 0 OR DAYOFMONTH({quoted}) = 0)"


def _select_sql(column: sa.Column[Any], quoted: str, arrow: pa.DataType, *, guard_dates: bool) -> str:
    t = column.type
    if pa.types.is_decimal(arrow) and not _carried_exactly(arrow):
        return f"CAST({quoted} AS CHAR)"
    if isinstance(t, sa.BINARY) and t.length == 0:
        # A view's ``NULL AS x`` column (reflected as BINARY(0)) is MYSQL_TYPE_NULL on the wire,
        # which connectorx cannot read.
        return f"CAST({quoted} AS BINARY)"
    if isinstance(t, mysql.BIT):
        return f"CAST({quoted} AS UNSIGNED)"
    if enum_labels(column) is not None:
        return f"{quoted}+0"
    if _is_date(arrow) and guard_dates:
        return f"IF({_zero_date(quoted)}, NULL, {quoted})"
    if pa.types.is_duration(arrow):
        return f"CAST(TIME_TO_SEC({quoted}) * 1000000 AS SIGNED)"
    if isinstance(t, sa.JSON):
        return f"CAST({quoted} AS CHAR)"
    return quoted


def _restore(
    array: pa.Array | pa.ChunkedArray, arrow: pa.DataType, labels: pa.Array | None, where: str
) -> pa.Array:
    """The declared type from what the reader carried (``labels``: an ENUM read as its index;
    ``where``: the column, for errors)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if labels is not None:
        return pc.take(labels, array).cast(arrow)
    if pa.types.is_boolean(arrow):  # TINYINT(1), which connectorx reads as its number
        return tinyint1_as_boolean(array, where)
    if pa.types.is_duration(arrow):
        return pc.cast(array.cast(pa.int64()), arrow)
    if array.type != arrow:
        return pc.cast(array, arrow)
    return array


def statement(
    dialect: sa.Dialect,
    plan: Plan,
    lo: Any,
    hi: Any,
    *,
    guard_dates: bool = False,
    key_range: tuple[int | None, int | None] | None = None,
) -> str:
    """The SELECT for the window (``key_range``: one stream's share of it, see ``Plan.select``),
    with bounds rendered as literals (connectorx has no bind parameters).

    The bounds are values this code computed (datetimes, integers), rendered by SQLAlchemy's
    own literal processors for the dialect; identifiers are quoted by the dialect's preparer.
    """
    preparer = dialect.identifier_preparer
    # PyMySQL's format paramstyle makes the compiler double every % of the statement (identifiers,
    # literals, literal text) for the driver to undo; connectorx sends the text as it is, so it is
    # undone below. Names quoted here go into literal text, which the compiler doubles in turn.
    percents = preparer._double_percents

    def quote(name: str) -> str:
        quoted = preparer.quote(name)
        return quoted.replace("%%", "%") if percents else quoted

    columns = [
        sa.literal_column(
            _select_sql(c, quote(c.name), plan.schema.field(c.name).type, guard_dates=guard_dates)
        ).label(c.name)
        for c in plan.columns
    ]
    dates = [quote(c.name) for c in plan.columns if _is_date(plan.schema.field(c.name).type)]
    if guard_dates and dates:
        count = " + ".join(f"IFNULL({_zero_date(d)}, 0)" for d in dates)
        columns.append(sa.literal_column(f"CAST({count} AS SIGNED)").label(ZERO_DATES_COLUMN))
    sql = str(
        plan.select(columns, lo, hi, key_range).compile(
            dialect=dialect, compile_kwargs={"literal_binds": True}
        )
    )
    if percents:
        sql = sql.replace("%%", "%")
    server = getattr(dialect, "server_version_info", None) or ()
    if getattr(dialect, "is_mariadb", False):
        return f"SET STATEMENT time_zone = '+00:00' FOR {sql}"
    if server >= (8, 0):
        return sql.replace("SELECT ", "SELECT /*+ SET_VAR(time_zone = '+00:00') */ ", 1)
    return sql


def stream_arrow(
    url: str,
    dialect: sa.Dialect,
    plan: Plan,
    lo: Any,
    hi: Any,
    batch_size: int,
    stats: ExtractionStats,
    *,
    guard_dates: bool,
    cuts: Sequence[int] = (),
) -> Iterator[tuple[list[pa.Array], int]]:
    """Yields (the batch's columns in their declared types, zero dates nulled in it).

    ``cuts``: the window is read in ``len(cuts) + 1`` parallel streams, one per primary-key
    range between them (see ``key_cuts``), each decoded by connectorx in a thread of its own;
    their batches come in turn. Paced in the caller's thread; what the caller is not ready for
    waits on local disk (``Spill``).
    """
    import connectorx as cx

    ranges = list(zip((None, *cuts), (*cuts, None), strict=True)) if cuts else [None]
    sqls = [statement(dialect, plan, lo, hi, guard_dates=guard_dates, key_range=r) for r in ranges]
    types = [plan.schema.field(c.name).type for c in plan.columns]
    labels = [None if (e := enum_labels(c)) is None else string_array(e) for c in plan.columns]
    names = [f"{plan.spec.qualified_name}.{c.name}" for c in plan.columns]
    password = _password(url)
    readers: list[Any] = []
    streams: list[Iterator[pa.RecordBatch]] = []
    try:
        for sql in sqls:  # every stream's query starts before the first batch is taken
            readers.append(cx.read_sql(url, sql, return_type="arrow_stream", batch_size=batch_size))
            streams.append(iter(Paced(iter(readers[-1]), READ_AHEAD_BATCHES, Spill(stats))))
        for batch in _in_turn(streams):
            arrays = [_restore(batch.column(i), arrow, labels[i], names[i]) for i, arrow in enumerate(types)]
            zero_dates = 0
            if batch.num_columns > len(types):
                zero_dates = pc.sum(batch.column(len(types))).as_py() or 0
            yield arrays, zero_dates
    except BaseException as exc:  # connectorx raises Rust panics as BaseException
        if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if password:
            message = message.replace(password, "***")
        if not guard_dates and "convert the value `Date(" in message:
            raise NeedsDateGuards(
                f"{plan.spec.qualified_name}: a zero date in the window; reading it again with date guards"
            ) from None
        raise ExtractionError(
            f"{plan.spec.qualified_name}: reading from the source failed: {message}"
        ) from None
    finally:
        for stream in streams:  # each stops its reader and removes its spill
            close_source(stream)
        for reader in readers:
            close_source(reader)


def _in_turn(streams: list[Iterator[pa.RecordBatch]]) -> Iterator[pa.RecordBatch]:
    """A batch of each stream in turn, until all have ended."""
    live = deque(streams)
    while live:
        stream = live.popleft()
        batch = next(stream, None)
        if batch is not None:
            live.append(stream)
            yield batch


def _password(url: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    secret = urlsplit(url).password
    return unquote(secret) if secret else None
