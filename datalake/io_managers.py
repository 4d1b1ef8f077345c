"""IO managers by role. Asset code never sees a path; these decide where data lives.

- ``BronzeIOManager``: append-only bronze; one file per run and partition, streamed, atomic;
  its metadata carries the extraction window and commits the watermark.
- ``ParquetIOManager``: silver, Rev-Sci and dimensions; one file per partition, including one
  file per partition from a single-run range backfill.
- ``DuckDBPathInputManager``: hands silver/gold a ``ParquetPaths`` handle over the upstream
  files instead of loading them.

When an input has no files (never materialized here, or a missing partition), the schema comes
from, in order: another file of the same asset in the same root; the upstream's latest
materialization's ``dagster/column_schema``; the upstream definition's ``dagster/column_schema``.
Metadata rather than a schema sidecar file, because it survives moving a group to a new root
(the case where no file exists yet) and needs no extra write per materialization.
"""

from __future__ import annotations

import collections.abc
import itertools
import posixpath
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dagster as dg
import pyarrow as pa
from pydantic import Field

from datalake.extract import Extraction, NeedsDateGuards, NotRetryable, WindowKind
from datalake.lake import (
    DEFAULT_ROW_GROUP_BYTES,
    DEFAULT_ROW_GROUP_SIZE,
    PARTITION_COLUMN_KEY,
    ParquetPaths,
    PartitionAssigner,
    PartitionMismatch,
    WriteResult,
    asset_file,
    asset_prefix,
    average_row_bytes,
    bronze_file,
    bronze_partition_of,
    bronze_prefix,
    check_columns_agree,
    loaded_class,
    output_metadata,
    schema_from_metadata,
    write_output,
    write_parquet,
    write_partitions,
)
from datalake.storage import AzureAccess, LakeStorage
from datalake.watermark import (
    WATERMARK_COLUMN_KEY,
    WATERMARK_KEY,
    committed_text,
    committing_record,
    decode_watermark,
    encode_watermark,
)

if TYPE_CHECKING:  # imported where frames are made: bronze runs never load polars
    import polars as pl

# Dagster records an asset's IO manager key in its definition metadata under this key (what
# ``AssetSpec.with_io_manager_key`` sets); the path input manager reads where that role wrote.
IO_MANAGER_KEY_METADATA = "dagster/io_manager_key"
BRONZE_ROLE = "bronze_io_manager"


def _asset_name(key: dg.AssetKey) -> str:
    """What names an asset's files under its root: the last part of its key."""
    return key.path[-1]


def check_storage_names(assets: Iterable[dg.AssetsDefinition]) -> None:
    """Refuses (at load) two assets whose files would be one another's: same root, same name.

    ``silver/customers/current`` and ``silver/partners/current`` both write ``current/…`` under
    the silver root; each run would overwrite the other's files and readers get the wrong table.
    """
    seen: dict[tuple[str, str], dg.AssetKey] = {}
    for assets_def in assets:
        for key in assets_def.keys:
            role = assets_def.get_io_manager_key_for_asset_key(key)
            other = seen.setdefault((role, _asset_name(key)), key)
            if other != key:
                raise ValueError(
                    f"assets {other.to_user_string()} and {key.to_user_string()} would write the same "
                    f"files ({_asset_name(key)}/… under {role}'s root, named by the last part of the key): "
                    "rename one"
                )


class _LakeRoot(dg.ConfigurableIOManager):
    root: str
    azure: AzureAccess | None = None

    def storage(self) -> LakeStorage:
        return LakeStorage(self.root, self.azure)


# --- what an input wants, from its annotation ---------------------------------------


@dataclass(frozen=True)
class _Wanted:
    lazy: bool
    # True: a dict {partition key: frame}; False: one frame; None (unannotated): dict if several.
    as_dict: bool | None


def _polars_class(hint: Any, name: str) -> bool:
    # An annotation naming a polars class means the asset's module imported polars.
    cls = loaded_class("polars", name)
    return cls is not None and hint is cls


def _wanted(context: dg.InputContext) -> _Wanted:
    hint = context.dagster_type.typing_type
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X], X | None: as X
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = members[0] if len(members) == 1 else hint
    if typing.get_origin(hint) in (dict, collections.abc.Mapping):
        args = typing.get_args(hint)
        return _Wanted(lazy=len(args) == 2 and _polars_class(args[1], "LazyFrame"), as_dict=True)
    if _polars_class(hint, "LazyFrame"):
        return _Wanted(lazy=True, as_dict=False)
    if _polars_class(hint, "DataFrame"):
        return _Wanted(lazy=False, as_dict=False)
    return _Wanted(lazy=False, as_dict=None)


def _mapped_keys(context: dg.InputContext) -> tuple[str, ...] | None:
    """Upstream partition keys this input maps to; None when the upstream is unpartitioned."""
    if not context.has_asset_partitions:
        return None
    return tuple(context.asset_partition_keys)


def _scan(storage: LakeStorage, files: Sequence[str]) -> pl.LazyFrame:
    """A lazy scan over files (native reader, also on Azure); columns unified by name."""
    import polars as pl

    scans = []
    for relative in files:
        source, options = storage.polars_source(relative)
        scans.append(pl.scan_parquet(source, storage_options=options, glob=False))  # a file, not a pattern
    return scans[0] if len(scans) == 1 else pl.concat(scans, how="diagonal_relaxed")


def _check_polars_reads(storage: LakeStorage, files: Sequence[str], what: str) -> None:
    """Refuses what a polars load would silently read as something else: files whose column means
    another kind of value in one than another (``check_columns_agree``: polars' relaxed concat made
    an INT and a DATETIME one Int64), and decimals of more than 38 digits (polars' limit; its own
    error named neither the asset nor the column)."""
    schemas = storage.read_schemas(files, storage.footers(files))
    check_columns_agree(what, schemas)
    for file, schema in schemas.items():
        for f in schema:
            if pa.types.is_decimal(f.type) and f.type.precision > 38:
                raise ValueError(
                    f"{what}: column {f.name!r} is {f.type} in {file}, and polars holds decimals of at "
                    "most 38 digits; read this input as a DuckDB path input (input_manager_key="
                    "'duckdb_path_input_manager', annotated ParquetPaths), which reads it as DOUBLE"
                )


def _empty(schema: pa.Schema) -> pl.LazyFrame:
    import polars as pl

    frame = pl.from_arrow(schema.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.lazy()


def _shape(frames: Mapping[str, pl.LazyFrame], wanted: _Wanted) -> Any:
    """Frames per partition as the input asked: one frame or a dict, lazy or collected."""
    import polars as pl

    def done(frame: pl.LazyFrame) -> pl.LazyFrame | pl.DataFrame:
        return frame if wanted.lazy else frame.collect()

    if wanted.as_dict or (wanted.as_dict is None and len(frames) > 1):
        return {key: done(frame) for key, frame in frames.items()}
    values = list(frames.values())
    return done(values[0] if len(values) == 1 else pl.concat(values, how="diagonal_relaxed"))


# --- schemas when there are no files --------------------------------------------------


def latest_file(storage: LakeStorage, files: Sequence[str]) -> str:
    """The latest of the listed ``files`` (sorted by name), whose schema is the upstream's now.

    By name, the last partition's; in a bronze ingestion date, though, runs' files sort by run id:
    of those, the last written (after a column was added, an earlier run's file lacks it).
    """
    last = files[-1]
    if bronze_partition_of(last) is None:
        return last
    directory = posixpath.dirname(last)
    same_day = [f for f in files if posixpath.dirname(f) == directory]
    return last if len(same_day) == 1 else max(same_day, key=storage.modified)


def resolve_schema(storage: LakeStorage, context: dg.InputContext, candidates: Sequence[str]) -> pa.Schema:
    """The upstream's schema: its latest file here, else its recorded/declared column schema."""
    if candidates:
        return storage.read_schema(latest_file(storage, candidates))
    metadata_sources: list[Mapping[str, Any]] = []
    try:
        event = context.instance.get_latest_materialization_event(context.asset_key)
    except Exception:  # no instance (a bare InputContext): only the definition is left
        event = None
    if event is not None and event.asset_materialization is not None:
        metadata_sources.append(event.asset_materialization.metadata)
    upstream = context.upstream_output
    if upstream is not None:
        metadata_sources.append(upstream.definition_metadata or {})
    for metadata in metadata_sources:
        schema = schema_from_metadata(metadata)
        if schema is not None:
            return schema
    raise dg.Failure(
        f"{context.asset_key.to_user_string()} has no files under {storage.uri('')} and no recorded "
        "dagster/column_schema to build an empty input from: materialize it first"
    )


# --- bronze --------------------------------------------------------------------------


def _not_behind(context: dg.OutputContext, obj: Extraction, mine: str) -> str:
    """The watermark to commit: this run's, or a newer one another incremental run of the table
    committed while this one read (two schedules, a UI materialization): the newest commit wins,
    and this run's older ``hi`` would move the watermark back (its window read again)."""
    spec = obj.spec
    if obj.window.kind is not WindowKind.INCREMENTAL or obj.window.lo_from_operator or spec.cursor is None:
        return mine  # a full refresh or an operator's watermark: what was asked for
    record = committing_record(context.step_context.instance, context.asset_key)
    if record is None:
        return mine
    theirs = committed_text(record)
    materialization = record.asset_materialization
    column = materialization.metadata.get(WATERMARK_COLUMN_KEY) if materialization else None
    if column is not None and str(column.value) != spec.cursor.column:
        return mine  # a watermark of another cursor column (checked when this run started)
    try:
        newer = decode_watermark(theirs, spec.cursor.kind) > decode_watermark(mine, spec.cursor.kind)
    except ValueError:  # another cursor kind: this run's (it was checked when the run started)
        return mine
    if not newer:
        return mine
    context.log.info(
        f"{spec.qualified_name}: another run committed {theirs} while this one read up to {mine}; "
        "keeping the newer watermark"
    )
    return theirs


class BronzeIOManager(_LakeRoot):
    """Writes an ``Extraction`` to ``<table>/ingestion_date=D/<table>_<run_id>.parquet``.

    Streamed: row groups of the spec's batch size, so memory follows the batch size. A retry of
    the same run rewrites only its own file; other runs' files are never touched.
    Loads (for assets that want frames) follow the annotation: ``pl.LazyFrame`` scans,
    ``pl.DataFrame`` reads; ``dict[str, …]`` gives one frame per ingestion date.
    """

    def handle_output(self, context: dg.OutputContext, obj: Extraction) -> None:
        if not isinstance(obj, Extraction):
            raise TypeError(f"bronze assets return an Extraction, got {type(obj).__name__}")
        storage = self.storage()
        table = _asset_name(context.asset_key)
        relative = bronze_file(table, context.partition_key, context.run_id)
        try:
            try:
                written = _write_bronze(storage, relative, context, obj)
            except NeedsDateGuards as exc:
                # Nothing of the first attempt is visible (the write was not committed).
                context.log.warning(str(exc))
                obj.reread_with_date_guards()
                written = _write_bronze(storage, relative, context, obj)
        except NotRetryable as exc:  # e.g. a set_watermark beyond the source: a retry reads the same
            raise dg.Failure(str(exc), allow_retries=False) from None
        metadata: dict[str, Any] = {**output_metadata(written), **obj.metadata()}
        if obj.watermark is not None:
            # The commit: recorded only because the file above is durably in place.
            metadata[WATERMARK_KEY] = _not_behind(context, obj, encode_watermark(obj.watermark))
            if obj.spec.cursor is not None:
                metadata[WATERMARK_COLUMN_KEY] = obj.spec.cursor.column
        context.add_output_metadata(metadata)

    def load_input(self, context: dg.InputContext) -> Any:
        storage = self.storage()
        files, all_files, keys = _bronze_listing(storage, context)
        _check_polars_reads(storage, files, context.asset_key.to_user_string())
        wanted = _wanted(context)
        # A dict when asked for, or (unannotated) when several partitions are mapped: as silver.
        if keys is None or not (wanted.as_dict or (wanted.as_dict is None and len(keys) > 1)):
            frame = _scan(storage, files) if files else _empty(resolve_schema(storage, context, all_files))
            return _shape({"": frame}, _Wanted(wanted.lazy, as_dict=False))
        by_key = {k: [f for f in files if bronze_partition_of(f) == k] for k in keys}
        frames: dict[str, pl.LazyFrame] = {}
        schema: pa.Schema | None = None
        for key, key_files in by_key.items():
            if key_files:
                frames[key] = _scan(storage, key_files)
            else:
                schema = schema or resolve_schema(storage, context, files or all_files)
                frames[key] = _empty(schema)
        return _shape(frames, _Wanted(wanted.lazy, as_dict=True))


def _write_bronze(
    storage: LakeStorage, relative: str, context: dg.OutputContext, obj: Extraction
) -> WriteResult:
    """One row group per ``batch_size`` rows or ``batch_bytes``, whatever size the reader's batches are."""
    batches = _with_tombstones(storage, context, obj)
    return write_parquet(
        storage,
        relative,
        obj.schema,
        batches,
        row_group_size=obj.batch_size or None,
        use_dictionary=obj.dictionary_columns,
        row_group_bytes=obj.batch_bytes or None,
    )


def _with_tombstones(
    storage: LakeStorage, context: dg.OutputContext, obj: Extraction
) -> Iterator[pa.RecordBatch]:
    """The extraction's batches, followed by delete tombstones when it reconciles deletes."""
    if obj.reconcile is None:
        return obj.batches
    # Tombstones follow the window's rows in the same file; the keys are compared with every
    # file of the table already in the lake and with this run's window (tapped as it streams).
    table = _asset_name(context.asset_key)
    own = bronze_file(table, context.partition_key, context.run_id)
    existing = [f for f in storage.list_files(bronze_prefix(table)) if f != own]
    handle = ParquetPaths(
        asset_key=context.asset_key,
        files=tuple(storage.reader_path(f) for f in existing),
        schema=obj.schema,
        filesystem=storage.scan_fs,
        footers=storage.footers(existing),
    )
    reconcile = obj.reconcile
    return itertools.chain(
        reconcile.window(obj.batches), _later(lambda: reconcile.tombstones(handle, obj.stats.rows))
    )


def _later(make: Callable[[], Iterator[pa.RecordBatch]]) -> Iterator[pa.RecordBatch]:
    """Starts ``make()`` only when reached: after the window's batches are written."""
    yield from make()


def _bronze_listing(
    storage: LakeStorage, context: dg.InputContext
) -> tuple[list[str], list[str], tuple[str, ...] | None]:
    """(files of the mapped ingestion dates — every run's file, all files of the table, mapped keys)."""
    keys = _mapped_keys(context)
    all_files = storage.list_files(bronze_prefix(_asset_name(context.asset_key)))
    wanted = None if keys is None else set(keys)
    files = [f for f in all_files if wanted is None or bronze_partition_of(f) in wanted]
    return files, all_files, keys


def bronze_paths(storage: LakeStorage, context: dg.InputContext) -> ParquetPaths:
    """The bronze files of the mapped ingestion dates, as a path handle."""
    files, all_files, keys = _bronze_listing(storage, context)
    return _paths(storage, context, files, all_files, keys)


def asset_paths(storage: LakeStorage, context: dg.InputContext) -> ParquetPaths:
    """The files of a ParquetIOManager asset for the mapped partitions, as a path handle."""
    name = _asset_name(context.asset_key)
    keys = _mapped_keys(context)
    all_files = storage.list_files(asset_prefix(name))
    wanted = [asset_file(name, None)] if keys is None else [asset_file(name, k) for k in keys]
    present = set(all_files)
    return _paths(storage, context, [f for f in wanted if f in present], all_files, keys)


def _paths(
    storage: LakeStorage,
    context: dg.InputContext,
    files: list[str],
    all_files: list[str],
    keys: tuple[str, ...] | None,
) -> ParquetPaths:
    # Schema from the mapped files when there are any, else from any file of the asset, else metadata.
    candidates = files or all_files
    footers = storage.footers(files)
    # Every file's footer, not only the newest's: a column may be gone from it (dropped in the
    # source, or excluded) and still be in older files, which DuckDB reads with the rest.
    read = {f: storage.read_footer(f, footers) for f in files}
    row_bytes = None
    if candidates:
        latest = latest_file(storage, candidates)
        schema, footer = read.get(latest) or storage.read_footer(latest, footers)
        row_bytes = average_row_bytes(footer)
    else:
        schema = resolve_schema(storage, context, candidates)
    schemas = {f: file_schema for f, (file_schema, _) in read.items()} or {"": schema}
    what = context.asset_key.to_user_string()
    check_columns_agree(what, schemas)
    paths = ParquetPaths(
        asset_key=context.asset_key,
        files=tuple(storage.reader_path(f) for f in files),
        schema=schema,
        partition_keys=keys,
        filesystem=storage.scan_fs,
        row_bytes=row_bytes,
        footers=footers,
        file_schemas={storage.reader_path(f): schemas[f] for f in files},
    )
    STEP_INPUT_WIDTHS.record(context, paths)
    for name, stand_in in duckdb_stand_ins(schemas.values()):
        context.log.warning(f"{what}: column {name!r} {stand_in}")
    return paths


def duckdb_stand_ins(schemas: Iterable[pa.Schema]) -> list[tuple[str, str]]:
    """Columns DuckDB cannot read as they are typed (in any of the files), and what it reads them as."""
    found: dict[str, str] = {}
    for schema in schemas:
        for f in schema:
            if pa.types.is_decimal(f.type) and f.type.precision > 38 and f.name not in found:
                found[f.name] = (
                    f"is {f.type}: DuckDB reads decimals of more than 38 digits as DOUBLE (approximate)"
                )
    return list(found.items())


class _StepInputWidths:
    """The average row width of the path inputs each step loaded, to size reads of its outputs.

    A DuckDB relation does not say how wide its rows are before it runs. The step's inputs do
    (their files' footers), and a projection, filter or join of them is at most as wide as they
    are together. The input manager and the step's IO manager run in the same process; entries
    are kept per (run, step) for the step's outputs, for a bounded number of recent steps.
    """

    LIMIT = 256

    def __init__(self) -> None:
        self._widths: collections.OrderedDict[tuple[str, str], dict[str, int]] = collections.OrderedDict()

    def record(self, context: dg.InputContext, paths: ParquetPaths) -> None:
        try:
            step = context.step_context
        except Exception:  # a bare InputContext (direct call): no step to remember it for
            return
        if paths.row_bytes is None:
            return
        key = (step.run_id, step.step.key)
        self._widths.setdefault(key, {})[context.name or ""] = paths.row_bytes
        self._widths.move_to_end(key)
        while len(self._widths) > self.LIMIT:
            self._widths.popitem(last=False)

    def total(self, context: dg.OutputContext) -> int | None:
        try:
            key = (context.run_id, context.step_key)
        except Exception:  # a bare OutputContext
            return None
        widths = self._widths.get(key)
        return sum(widths.values()) if widths else None


STEP_INPUT_WIDTHS = _StepInputWidths()


# --- silver, Rev-Sci, dimensions ------------------------------------------------------


class ParquetIOManager(_LakeRoot):
    """Silver, Rev-Sci and dimension tables: zstd Parquet with statistics, one file per partition.

    Stores polars DataFrames and LazyFrames (sunk, never collected), pyarrow Tables, record-batch
    readers and DuckDB relations. A partitioned asset run over a range of partitions (single-run
    backfill) returns one output; it is split into one file per partition by the column named in
    the asset's ``datalake/partition_column`` metadata (or the asset returns a dict
    {partition key: frame}). Partitions of the range without rows get an empty file with the schema,
    and each partition's materialization records its own row count.
    """

    row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    # A row group also ends at this many bytes of Arrow data (wide rows); reads of a DuckDB output
    # are sized to an eighth of it from the width of the step's path inputs.
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        storage = self.storage()
        name = _asset_name(context.asset_key)
        bounds = {
            "row_group_size": self.row_group_size,
            "row_group_bytes": self.row_group_bytes,
            "row_bytes": STEP_INPUT_WIDTHS.total(context),
        }
        if not context.has_asset_partitions:
            written = write_output(storage, asset_file(name, None), obj, **bounds)
            context.add_output_metadata(output_metadata(written))
            return
        keys = list(context.asset_partition_keys)
        files = {key: asset_file(name, key) for key in keys}
        column = context.definition_metadata.get(PARTITION_COLUMN_KEY)
        if isinstance(obj, Mapping):
            results = self._write_dict(storage, files, obj, bounds)
        elif column:
            assigner = PartitionAssigner.for_partitions(context.asset_partitions_def, keys, str(column))
            try:
                results = write_partitions(storage, files, obj, assigner, **bounds)
            except PartitionMismatch as exc:
                raise dg.Failure(f"{context.asset_key.to_user_string()}: {exc}; nothing was written") from exc
        elif len(keys) == 1:
            results = {keys[0]: write_output(storage, files[keys[0]], obj, **bounds)}
        else:
            raise dg.Failure(
                f"{context.asset_key.to_user_string()} returned one output for {len(keys)} partitions: "
                f"declare the column that places a row in a partition as metadata "
                f"{{'{PARTITION_COLUMN_KEY}': '<column>'}}, or return a dict {{partition key: frame}}"
            )
        _record(context, results)

    def _write_dict(
        self,
        storage: LakeStorage,
        files: Mapping[str, str],
        obj: Mapping[Any, Any],
        bounds: Mapping[str, Any],
    ) -> dict[str, WriteResult]:
        unknown = sorted(str(k) for k in obj if k not in files)
        if unknown:
            raise dg.Failure(f"partition keys {unknown} are not targeted by this run")
        left = [key for key in files if key not in obj]
        if left and not obj:
            # Nothing to take the schema of their empty files from; refused before any write.
            raise dg.Failure(
                f"the output is an empty dict for partitions {left[0]}..{left[-1]}: return an empty "
                "frame with the schema for a partition without rows"
            )
        # Published together, as a range split is: none of the files if any of them fails.
        with storage.atomic_group() as group:
            results = {
                key: write_output(storage, files[key], value, **bounds, group=group)
                for key, value in obj.items()
            }
            schema = next((r.schema for r in results.values() if r.schema is not None), None)
            for key in left:
                if schema is None:
                    raise dg.Failure(
                        f"no partition's output has a schema to write partition {key} empty with"
                    )
                results[key] = write_output(storage, files[key], schema.empty_table(), **bounds, group=group)
        return results

    def load_input(self, context: dg.InputContext) -> Any:
        storage = self.storage()
        name = _asset_name(context.asset_key)
        keys = _mapped_keys(context)
        wanted = _wanted(context)
        present = storage.list_files(asset_prefix(name))
        if keys == ():  # mapped to no upstream partition (an offset before the first): none, with the schema
            if wanted.as_dict:
                return {}
            return _shape(
                {"": _empty(resolve_schema(storage, context, present))}, _Wanted(wanted.lazy, False)
            )
        targets = {"": asset_file(name, None)} if keys is None else {k: asset_file(name, k) for k in keys}
        missing = [key for key, f in targets.items() if f not in present]
        frames: dict[str, pl.LazyFrame] = {}
        schema: pa.Schema | None = None
        if missing:
            context.log.warning(
                f"{context.asset_key.to_user_string()}: no file for partition(s) "
                f"{', '.join(missing) or '(unpartitioned)'}; loading them as empty frames"
            )
            schema = resolve_schema(storage, context, present)
        loaded = [relative for key, relative in targets.items() if key not in missing]
        _check_polars_reads(storage, loaded, context.asset_key.to_user_string())
        for key, relative in targets.items():
            frames[key] = _scan(storage, [relative]) if key not in missing else _empty(schema)  # type: ignore[arg-type]
        if keys is None:
            wanted = _Wanted(wanted.lazy, as_dict=False)
        return _shape(frames, wanted)


def _record(context: dg.OutputContext, results: Mapping[str, WriteResult]) -> None:
    """Metadata per partition: each partition's materialization gets its own file, rows and bytes."""
    if len(results) == 1:
        context.add_output_metadata(output_metadata(next(iter(results.values())), partitioned=True))
        return
    total = sum(r.rows for r in results.values())
    summary = {
        "datalake/range_partitions": len(results),
        "datalake/range_row_count": total,
        "datalake/range_bytes_written": sum(r.bytes for r in results.values()),
    }
    try:
        step = context.step_context
    except Exception:  # a bare OutputContext (direct call): no per-partition events to attach to
        step = None
    if step is None:
        context.add_output_metadata(
            {**summary, "datalake/partition_row_counts": {k: r.rows for k, r in results.items()}}
        )
        return
    for key, written in results.items():
        # Partition-scoped entries override the output's for that partition's materialization event.
        step.add_asset_metadata(
            output_metadata(written, partitioned=True), asset_key=context.asset_key, partition_key=key
        )
    context.add_output_metadata(summary)


# --- DuckDB path inputs ----------------------------------------------------------------


class DuckDBPathInputManager(dg.ConfigurableIOManager):
    """Hands an asset ``ParquetPaths`` for the upstream's mapped partitions (one, a range, all).

    An input manager only (``AssetIn(input_manager_key=...)``); it stores nothing. It reads where
    the upstream's own IO manager wrote: ``roots`` maps that IO manager's role key to its root,
    so moving a group's root moves its readers with it.
    """

    roots: dict[str, str]
    # Roles that write the append-only bronze layout; every other role writes <asset>/<key>.parquet.
    append_only_roles: list[str] = Field(default_factory=lambda: [BRONZE_ROLE])
    layer_roles: dict[str, str] = Field(
        default_factory=lambda: {
            "bronze": BRONZE_ROLE,
            "silver": "silver_io_manager",
            "revsci": "revsci_io_manager",
        }
    )
    azure: AzureAccess | None = None

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        raise NotImplementedError(
            "duckdb_path_input_manager only loads inputs; store outputs with a lake IO manager"
        )

    def _upstream_role(self, context: dg.InputContext) -> str:
        """The IO manager key the upstream asset is stored by: the first known of the asset
        graph's (``@asset(io_manager_key=…)`` or ``AssetSpec.with_io_manager_key``), the upstream
        output's ``dagster/io_manager_key`` metadata, and the role of its layer prefix."""
        candidates: list[str] = []
        try:
            graph = context.step_context.job_def.asset_layer.asset_graph
            candidates.append(graph.get(context.asset_key).io_manager_key)
        except Exception:  # a bare InputContext (direct call): no job to ask
            pass
        upstream = context.upstream_output
        metadata_role = (
            (upstream.definition_metadata or {}).get(IO_MANAGER_KEY_METADATA) if upstream else None
        )
        if metadata_role:
            candidates.append(str(metadata_role))
        layer_role = self.layer_roles.get(context.asset_key.path[0])
        if layer_role:
            candidates.append(layer_role)
        return next((c for c in candidates if c in self.roots), candidates[0] if candidates else "io_manager")

    def load_input(self, context: dg.InputContext) -> ParquetPaths:
        role = self._upstream_role(context)
        root = self.roots.get(role)
        if root is None:
            raise dg.Failure(
                f"{context.asset_key.to_user_string()} is stored by IO manager {role!r}, which has no "
                f"lake root here (known: {', '.join(sorted(self.roots))})"
            )
        storage = LakeStorage(root, self.azure)
        if role in self.append_only_roles:
            return bronze_paths(storage, context)
        return asset_paths(storage, context)
