"""Hard deletes: primary-key reconciliation that writes tombstones into bronze.

No watermark sees a deleted row. On demand (run config ``reconcile_deletes: true``) or on the
``bronze_delete_reconciliation`` schedule, the bronze run — after its window — streams the
source's primary keys (keys only) and anti-joins them with the keys the lake currently holds
(latest version per key, not already deleted). Each missing key gets a tombstone row in the
same bronze file: its key columns, its latest cursor value, ``_datalake_deleted = true`` and the
run's lineage; other columns NULL. Current-state silver drops keys whose latest version is a
tombstone; bronze keeps the whole history. A re-inserted key comes back with a newer cursor and
wins over its tombstone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

from datalake.extract import (
    DELETED_COLUMN,
    EXTRACTED_AT_COLUMN,
    ROW_SEQ_COLUMN,
    RUN_ID_COLUMN,
    Extraction,
    Window,
    WindowKind,
    plan_extraction,
    stream_rows,
)
from datalake.lake import ParquetPaths


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def source_keys(engine: sa.Engine, extraction: Extraction, batch_size: int) -> Iterator[pa.RecordBatch]:
    """The source's primary keys, streamed in batches (keys only)."""
    spec = extraction.spec
    with engine.connect() as conn:
        plan = plan_extraction(conn, spec, Window(WindowKind.SNAPSHOT))
        keys = tuple(plan.table.c[k] for k in spec.primary_key)
        fields = [plan.schema.field(k) for k in spec.primary_key]
        key_plan = dataclasses.replace(plan, columns=keys, schema=pa.schema(fields))
        for arrays, _zero in stream_rows(conn, key_plan, None, None, batch_size):
            yield pa.RecordBatch.from_arrays(arrays, schema=key_plan.schema)


def reconciler(
    engine: sa.Engine, extraction: Extraction, batch_size: int
) -> Callable[[ParquetPaths, int], Iterator[pa.RecordBatch]]:
    """What the bronze IO manager calls after the window's rows: tombstone batches for deleted keys.

    ``existing`` is every visible bronze file of the table; ``first_seq`` continues the run's
    row sequence.
    """

    def tombstones(existing: ParquetPaths, first_seq: int) -> Iterator[pa.RecordBatch]:
        spec, schema = extraction.spec, extraction.schema
        if existing.is_empty:
            extraction.stats.deletes = 0
            return
        import duckdb

        con = duckdb.connect()
        keys = [_q(k) for k in spec.primary_key]
        cursor = _q(spec.cursor.column) if spec.cursor else None
        order = [f"{cursor} DESC NULLS LAST"] if cursor else []
        order += [f"{_q(EXTRACTED_AT_COLUMN)} DESC", f"{_q(ROW_SEQ_COLUMN)} DESC"]
        lake = existing.relation(con)
        deleted = f"coalesce({_q(DELETED_COLUMN)}, false)" if DELETED_COLUMN in lake.columns else "false"
        lake.create_view("lake")
        reader = pa.RecordBatchReader.from_batches(
            pa.schema([schema.field(k) for k in spec.primary_key]),
            source_keys(engine, extraction, batch_size),
        )
        con.register("source_keys", reader)
        # identifiers only (validated by the registry, quoted); no values
        con.execute(
            f"CREATE TEMP TABLE gone AS SELECT {', '.join(keys)}{', ' + cursor if cursor else ''} FROM ("  # noqa: S608
            f"  SELECT *, {deleted} AS __deleted FROM lake"
            f"  QUALIFY row_number() OVER (PARTITION BY {', '.join(keys)} ORDER BY {', '.join(order)}) = 1"
            f") latest WHERE NOT __deleted AND ({', '.join(keys)}) NOT IN "
            f"(SELECT ({', '.join(keys)}) FROM source_keys)"
        )
        # fetchall: duckdb 2 keeps a result open after fetchone(), which blocks the next query.
        extraction.stats.deletes = int(con.execute("SELECT count(*) FROM gone").fetchall()[0][0])
        if not extraction.stats.deletes:
            return
        now = dt.datetime.now(dt.UTC)
        seq = first_seq
        for batch in con.sql("SELECT * FROM gone").to_arrow_reader(batch_size):
            yield _tombstone_batch(schema, batch, extraction, now, seq)
            seq += batch.num_rows

    return tombstones


def _tombstone_batch(
    schema: pa.Schema, keys: pa.RecordBatch, extraction: Extraction, now: dt.datetime, first_seq: int
) -> pa.RecordBatch:
    n = keys.num_rows
    arrays: list[Any] = []
    for field in schema:
        if field.name in keys.schema.names:
            arrays.append(keys.column(field.name).cast(field.type))
        elif field.name == RUN_ID_COLUMN:
            arrays.append(pa.repeat(pa.scalar(extraction.run_id, pa.string()), n))
        elif field.name == EXTRACTED_AT_COLUMN:
            arrays.append(pa.repeat(pa.scalar(now, field.type), n))
        elif field.name == ROW_SEQ_COLUMN:
            arrays.append(pa.array(range(first_seq, first_seq + n), pa.int64()))
        elif field.name == DELETED_COLUMN:
            arrays.append(pa.repeat(pa.scalar(True), n))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
