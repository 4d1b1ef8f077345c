"""IO managers by role. Asset code never sees a path; these decide where data lives.

- ``BronzeIOManager``: append-only bronze; one file per run and partition, streamed, atomic;
  its metadata carries the extraction window and commits the watermark.
- ``ParquetIOManager``: silver, Rev-Sci and dimensions; one file per partition.
- ``DuckDBPathInputManager``: hands silver/gold a ``ParquetPaths`` handle over the upstream
  files instead of loading them.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import polars as pl
import pyarrow.parquet as pq

from datalake.extract import Extraction
from datalake.lake import (
    ParquetPaths,
    asset_file,
    bronze_file,
    bronze_partition_of,
    bronze_prefix,
    output_metadata,
    record_batches,
    write_parquet,
)
from datalake.storage import AzureBlobResource, LakeStorage
from datalake.watermark import WATERMARK_KEY, encode_watermark


def _asset_name(key: dg.AssetKey) -> str:
    return key.path[-1]


class _LakeRoot(dg.ConfigurableIOManager):
    root: str
    azure: AzureBlobResource

    def storage(self) -> LakeStorage:
        return LakeStorage(self.root, self.azure)


class BronzeIOManager(_LakeRoot):
    """Writes an ``Extraction`` to ``<table>/ingestion_date=D/<table>_<run_id>.parquet``.

    A retry of the same run rewrites only its own file; other runs' files are never touched.
    """

    def handle_output(self, context: dg.OutputContext, obj: Extraction) -> None:
        if not isinstance(obj, Extraction):
            raise TypeError(f"bronze assets return an Extraction, got {type(obj).__name__}")
        storage = self.storage()
        table = _asset_name(context.asset_key)
        relative = bronze_file(table, context.partition_key, context.run_id)
        written = write_parquet(storage, relative, obj.schema, obj.batches)
        stats, resolved = obj.stats, obj.resolved
        metadata: dict[str, Any] = {
            **output_metadata(storage, relative, written),
            "datalake/window_kind": obj.window.kind.value,
            "datalake/window_lo": _text(resolved.get("lo")),
            "datalake/window_hi": _text(resolved.get("hi")),
            "datalake/zero_dates_nulled": stats.zero_dates,
            "datalake/null_cursor_rows": stats.null_cursor_rows,
            "datalake/batches": stats.batches,
            "datalake/seconds": round(stats.seconds, 3),
            "datalake/rows_per_second": round(stats.rows / max(stats.seconds, 1e-9)),
            "datalake/source": obj.source,
        }
        if obj.watermark is not None:
            # The commit: recorded only because the file above is durably in place.
            metadata[WATERMARK_KEY] = encode_watermark(obj.watermark)
        context.add_output_metadata(metadata)

    def load_input(self, context: dg.InputContext) -> pl.LazyFrame:
        paths = bronze_paths(self.storage(), context)
        if not paths.files:
            return pl.LazyFrame(schema=pl.Schema(paths.schema))
        return pl.scan_parquet(list(paths.files), missing_columns="insert", extra_columns="ignore")


def _text(value: Any) -> str:
    return "" if value is None else encode_watermark(value) if not isinstance(value, str) else value


def _mapped_keys(context: dg.InputContext) -> tuple[str, ...] | None:
    """Upstream partition keys this input maps to; None when the upstream is unpartitioned."""
    if not context.has_asset_partitions:
        return None
    return tuple(context.asset_partition_keys)


def bronze_paths(storage: LakeStorage, context: dg.InputContext) -> ParquetPaths:
    table = _asset_name(context.asset_key)
    keys = _mapped_keys(context)
    all_files = storage.list_files(bronze_prefix(table))
    wanted = None if keys is None else set(keys)
    files = [f for f in all_files if wanted is None or bronze_partition_of(f) in wanted]
    return _paths(storage, context.asset_key, files, all_files, keys)


def _paths(
    storage: LakeStorage,
    key: dg.AssetKey,
    files: list[str],
    all_files: list[str],
    keys: tuple[str, ...] | None,
) -> ParquetPaths:
    if files:
        schema = None
    elif all_files:
        with storage.open_read(all_files[-1]) as handle:
            schema = pq.read_schema(handle)
    else:
        raise dg.Failure(
            f"{key.to_user_string()} has no files in the lake yet: materialize it first "
            f"(looked under {storage.uri(key.path[-1])})"
        )
    if schema is None:
        with storage.open_read(files[-1]) as handle:
            schema = pq.read_schema(handle)
    return ParquetPaths(
        asset_key=key,
        files=tuple(storage.reader_path(f) for f in files),
        schema=schema,
        partition_keys=keys,
        filesystem=storage.fs if storage.root.is_azure else None,
    )


class ParquetIOManager(_LakeRoot):
    """Silver, Rev-Sci and dimension tables: zstd Parquet, one file per partition, atomic."""

    row_group_size: int = 122_880

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        storage = self.storage()
        name = _asset_name(context.asset_key)
        partition = context.partition_key if context.has_asset_partitions else None
        relative = asset_file(name, partition)
        schema, batches = record_batches(obj, self.row_group_size)
        written = write_parquet(storage, relative, schema, batches, row_group_size=self.row_group_size)
        context.add_output_metadata(output_metadata(storage, relative, written))

    def load_input(self, context: dg.InputContext) -> Any:
        storage = self.storage()
        name = _asset_name(context.asset_key)
        keys = _mapped_keys(context)
        lazy = context.dagster_type.typing_type is pl.LazyFrame
        files = [asset_file(name, None)] if keys is None else [asset_file(name, k) for k in keys]
        storage_options = None
        if storage.root.is_azure:
            frames = {f: pl.read_parquet(storage.open_read(f)) for f in files}
            loaded: dict[str, pl.LazyFrame | pl.DataFrame] = {
                f: (df.lazy() if lazy else df) for f, df in frames.items()
            }
        else:
            loaded = {
                f: (
                    pl.scan_parquet(storage.path(f), storage_options=storage_options)
                    if lazy
                    else pl.read_parquet(storage.path(f))
                )
                for f in files
            }
        if keys is None or len(keys) == 1:
            return next(iter(loaded.values()))
        return dict(zip(keys, loaded.values(), strict=True))


class DuckDBPathInputManager(dg.ConfigurableIOManager):
    """Hands an asset ``ParquetPaths`` for the upstream's mapped partitions (one, a range, all).

    An input manager only (``AssetIn(input_manager_key=...)``); it stores nothing.
    """

    bronze_root: str
    # Root of each non-bronze layer by asset-key prefix, e.g. {'silver': ..., 'revsci': ...}.
    roots: dict[str, str]
    azure: AzureBlobResource

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        raise NotImplementedError(
            "duckdb_path_input_manager only loads inputs; store outputs with a lake IO manager"
        )

    def load_input(self, context: dg.InputContext) -> ParquetPaths:
        key = context.asset_key
        layer = key.path[0] if len(key.path) > 1 else ""
        if layer == "bronze":
            return bronze_paths(LakeStorage(self.bronze_root, self.azure), context)
        root = self.roots.get(layer)
        if root is None:
            raise dg.Failure(f"no storage root for {key.to_user_string()} (layer {layer!r})")
        storage = LakeStorage(root, self.azure)
        name = _asset_name(key)
        keys = _mapped_keys(context)
        all_files = storage.list_files(name + "/")
        wanted = [asset_file(name, None)] if keys is None else [asset_file(name, k) for k in keys]
        present = set(all_files)
        return _paths(storage, key, [f for f in wanted if f in present], all_files, keys)
