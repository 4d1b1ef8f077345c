"""Hard deletes: primary-key reconciliation that writes tombstones into bronze.

No watermark sees a deleted row. On demand (run config ``reconcile_deletes: true``) or on the
``bronze_delete_reconciliation`` schedule, the bronze run — after its window — streams the
source's primary keys (keys only) and anti-joins them with the keys the lake holds, in its
earlier files and this run's window (latest version per key, not already deleted). Each missing
key gets a tombstone row in the same bronze file: its key columns, its latest cursor value,
``_datalake_deleted = true`` and the run's lineage; other columns NULL. Current-state silver counts
only the versions of a key extracted after its latest tombstone (``current_versions_sql``): a key
re-inserted after its delete is current again, even with an older cursor. Bronze keeps the whole
history.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from datalake.extract import (
    DELETED_COLUMN,
    EXTRACTED_AT_COLUMN,
    ROW_SEQ_COLUMN,
    RUN_ID_COLUMN,
    SPILL_PREFIX,
    Extraction,
    Window,
    WindowKind,
    plan_extraction,
    stream_rows,
    sweep_stale_spills,
)
from datalake.lake import ParquetPaths
from datalake.lake import quote_identifier as quote
from datalake.specs import TableSpec

# The order a key's versions were observed in: by run (extraction time), then within its file. A
# file without lineage (older than it) was observed before any tombstone: DuckDB would sort its
# NULLs above every value.
_OBSERVED = (
    f"{{'at': coalesce({quote(EXTRACTED_AT_COLUMN)}, '-infinity'::TIMESTAMPTZ), "
    f"'seq': coalesce({quote(ROW_SEQ_COLUMN)}, -1)}}"
)


def current_versions_sql(versions: str, spec: TableSpec, columns: str, *, tombstones: bool) -> str:
    """DuckDB SQL for the current version of each live key among bronze ``versions``, as ``columns``.

    ``versions`` names a view with the bronze columns, the lineage and a boolean ``__deleted``. A
    key's versions rank by cursor (NULLs last), then by extraction: a backfill re-reads old versions
    later, so extraction order alone is not the order of updates. A tombstone says the key was gone
    from the source when it was written, so only versions observed after the key's latest tombstone
    count: a key re-inserted after its delete is live again, even with an older cursor (a row
    restored from a backup, read by a full refresh); a key with none stays deleted.
    """
    keys = ", ".join(quote(k) for k in spec.primary_key)
    order = [f"{quote(spec.cursor.column)} DESC NULLS LAST"] if spec.cursor is not None else []
    order += [f"{quote(EXTRACTED_AT_COLUMN)} DESC", f"{quote(ROW_SEQ_COLUMN)} DESC"]
    latest = f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {', '.join(order)}) = 1"
    if not tombstones:
        return f"SELECT {columns} FROM {versions} WHERE NOT __deleted {latest}"  # noqa: S608
    return (
        f"WITH __gone AS (SELECT {keys}, max({_OBSERVED}) AS __gone_at FROM {versions} "  # noqa: S608
        f"WHERE __deleted GROUP BY ALL) "
        f"SELECT {columns} FROM {versions} LEFT JOIN __gone USING ({keys}) "
        f"WHERE NOT __deleted AND (__gone_at IS NULL OR {_OBSERVED} > __gone_at) {latest}"
    )


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


class Reconciler:
    """The delete reconciliation of one bronze run (see the module's docstring).

    The IO manager streams the window's batches through ``window`` and then writes what
    ``tombstones`` yields into the same file. The keys compared with the source's are those of the
    table's earlier files *and* of this run's window: a key updated or inserted in the window and
    deleted in the source before the key scan (a concurrent OLTP delete) is tombstoned, with the
    cursor of the version this run read, so silver's newest version of the key is the tombstone.
    """

    def __init__(self, engine: sa.Engine, extraction: Extraction, batch_size: int):
        self.engine = engine
        self.extraction = extraction
        self.batch_size = batch_size
        self.directory: str | None = None
        self.window_rows = 0

    def _columns(self) -> list[str]:
        spec = self.extraction.spec
        cursor = [spec.cursor.column] if spec.cursor else []
        return [*spec.primary_key, *cursor, EXTRACTED_AT_COLUMN, ROW_SEQ_COLUMN]

    def window(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """The window's batches, unchanged; their keys, cursor and lineage also go to a local file.

        The file (Parquet, a few columns) lives in a spill directory of this process under
        ``TMPDIR`` and is removed once the tombstones are computed (a killed run's is swept).
        """
        self.close()
        sweep_stale_spills()
        self.directory = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-keys-")
        self.window_rows = 0
        columns = self._columns()
        schema = pa.schema([self.extraction.schema.field(c) for c in columns])
        path = os.path.join(self.directory, "window.parquet")
        try:
            with pq.ParquetWriter(path, schema, compression="zstd") as writer:
                for batch in batches:
                    if batch.num_rows:
                        writer.write_batch(batch.select(columns))
                        self.window_rows += batch.num_rows
                    yield batch
        except BaseException:  # the run failed, or the stream was dropped: no tombstones follow
            self.close()
            raise

    def tombstones(self, existing: ParquetPaths, first_seq: int) -> Iterator[pa.RecordBatch]:
        """Tombstone batches for the keys gone from the source; ``first_seq`` continues the run's sequence."""
        try:
            yield from self._tombstones(existing, first_seq)
        finally:
            self.close()

    def _tombstones(self, existing: ParquetPaths, first_seq: int) -> Iterator[pa.RecordBatch]:
        extraction = self.extraction
        spec, schema = extraction.spec, extraction.schema
        if existing.is_empty and not self.window_rows:
            extraction.stats.deletes = 0
            return
        import duckdb

        con = duckdb.connect()
        keys = [quote(k) for k in spec.primary_key]
        cursor = quote(spec.cursor.column) if spec.cursor else None
        columns = ", ".join(quote(c) for c in self._columns())
        earlier = existing.relation(con)
        tombstones = DELETED_COLUMN in earlier.columns
        deleted = f"coalesce({quote(DELETED_COLUMN)}, false)" if tombstones else "false"
        earlier.create_view("earlier")
        # identifiers only (validated by the registry, quoted); the one path is this process's own
        lake = f"SELECT {columns}, {deleted} AS __deleted FROM earlier"  # noqa: S608
        if self.window_rows and self.directory is not None:
            window = os.path.join(self.directory, "window.parquet").replace("'", "''")
            lake += f" UNION ALL SELECT {columns}, false AS __deleted FROM read_parquet('{window}')"  # noqa: S608
        con.execute(f"CREATE VIEW lake AS {lake}")
        reader = pa.RecordBatchReader.from_batches(
            pa.schema([schema.field(k) for k in spec.primary_key]),
            source_keys(self.engine, extraction, self.batch_size),
        )
        con.register("source_keys", reader)
        # A tombstone is observed when the key scan starts: a version another run extracts after
        # that outranks it (see current_versions_sql). Should the key come back during the scan,
        # that errs to live, which the next reconciliation corrects; the other way would not heal.
        now = dt.datetime.now(dt.UTC)
        live = current_versions_sql("lake", spec, columns, tombstones=tombstones)
        con.execute(
            f"CREATE TEMP TABLE gone AS SELECT {', '.join(keys)}{', ' + cursor if cursor else ''} "  # noqa: S608
            f"FROM ({live}) WHERE ({', '.join(keys)}) NOT IN (SELECT ({', '.join(keys)}) FROM source_keys)"
        )
        # fetchall: duckdb 2 keeps a result open after fetchone(), which blocks the next query.
        extraction.stats.deletes = int(con.execute("SELECT count(*) FROM gone").fetchall()[0][0])
        if not extraction.stats.deletes:
            return
        seq = first_seq
        for batch in con.sql("SELECT * FROM gone").to_arrow_reader(self.batch_size):
            yield _tombstone_batch(schema, batch, extraction, now, seq)
            seq += batch.num_rows

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


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
