"""Lake layout, Parquet writing and the path handles silver reads bronze through.

Layout (DESIGN §3.4, §2):
- bronze:  ``<root>/<table>/ingestion_date=YYYY-MM-DD/<table>_<run_id>.parquet`` (append-only)
- others:  ``<root>/<asset>/<partition key>.parquet`` or ``<root>/<asset>/<asset>.parquet``
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from datalake.storage import LakeStorage, safe_segment

INGESTION_DATE = "ingestion_date"
DEFAULT_ROW_GROUP_SIZE = 122_880  # DuckDB's row-group size: good pruning granularity for its scans


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


def asset_file(asset: str, partition_key: str | None) -> str:
    name = safe_segment(asset)
    return f"{name}/{safe_segment(partition_key) if partition_key is not None else name}.parquet"


def table_schema(schema: pa.Schema) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name=f.name, type=str(f.type)) for f in schema])


@dataclass
class WriteResult:
    rows: int = 0
    row_groups: int = 0
    bytes: int = 0
    schema: pa.Schema | None = None


def write_parquet(
    storage: LakeStorage,
    relative: str,
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    *,
    row_group_size: int | None = None,
) -> WriteResult:
    """Streams batches into one Parquet file that becomes visible atomically.

    With ``row_group_size=None`` each incoming batch becomes one row group (bronze: one
    source batch = one row group); otherwise rows are regrouped to that size.
    """
    result = WriteResult(schema=schema)
    with storage.atomic_writer(relative) as sink:
        writer = pq.ParquetWriter(sink, schema, compression="zstd", write_statistics=True)
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                if batch.schema != schema:
                    batch = (
                        batch.cast(schema)
                        if batch.schema.names == schema.names
                        else batch.select(schema.names).cast(schema)
                    )
                writer.write_batch(batch, row_group_size=row_group_size or batch.num_rows)
                result.rows += batch.num_rows
                result.row_groups += 1
        finally:
            writer.close()
    result.bytes = storage.size(relative)
    return result


def output_metadata(storage: LakeStorage, relative: str, written: WriteResult) -> dict[str, Any]:
    return {
        "dagster/uri": dg.MetadataValue.path(storage.uri(relative)),
        "dagster/row_count": written.rows,
        "dagster/column_schema": table_schema(written.schema) if written.schema is not None else None,
        "datalake/bytes_written": written.bytes,
        "datalake/row_groups": written.row_groups,
    }


class DuckDBResource(dg.ConfigurableResource):
    """In-process DuckDB for silver and gold: one connection per asset execution."""

    memory_limit: str = "2GB"
    threads: int | None = None
    temp_directory: str | None = None

    def connect(self) -> duckdb.DuckDBPyConnection:
        config: dict[str, Any] = {"memory_limit": self.memory_limit}
        if self.threads:
            config["threads"] = self.threads
        if self.temp_directory:
            config["temp_directory"] = self.temp_directory
        return duckdb.connect(config=config)


@dataclass(frozen=True)
class ParquetPaths:
    """A path handle: the upstream files for the mapped partitions, and how to read them.

    DuckDB reads them in place (projection and predicate push-down at the file level);
    no files gives an empty relation with the upstream schema; columns are unified by name.
    """

    asset_key: dg.AssetKey
    files: tuple[str, ...]
    schema: pa.Schema
    partition_keys: tuple[str, ...] | None = None
    filesystem: fsspec.AbstractFileSystem | None = field(default=None, compare=False)

    def relation(self, con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyRelation:
        if not self.files:
            return con.from_arrow(self.schema.empty_table())
        if self.filesystem is not None:
            with contextlib.suppress(Exception):  # already registered on this connection
                con.register_filesystem(self.filesystem)
        return con.read_parquet(list(self.files), union_by_name=True)

    def view(self, con: duckdb.DuckDBPyConnection, name: str) -> duckdb.DuckDBPyRelation:
        """Registers the input under ``name`` for use in SQL text, and returns it."""
        relation = self.relation(con)
        relation.create_view(name, replace=True)
        return relation


def record_batches(
    obj: Any, batch_rows: int = DEFAULT_ROW_GROUP_SIZE
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Any supported output as (schema, stream of record batches), without collecting it whole."""
    import polars as pl

    if isinstance(obj, duckdb.DuckDBPyRelation):
        reader = obj.to_arrow_reader(batch_rows)
        return reader.schema, iter(reader)
    if isinstance(obj, pl.LazyFrame):
        frames = obj.collect_batches()
        first = next(frames, None)
        if first is None:
            return obj.collect_schema().to_arrow(), iter(())
        head = first.to_arrow().to_batches()
        schema = first.to_arrow().schema

        def rest() -> Iterator[pa.RecordBatch]:
            yield from head
            for frame in frames:
                yield from frame.to_arrow().to_batches()

        return schema, rest()
    if isinstance(obj, pl.DataFrame):
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
