"""Each lake IO manager on its own (local disk and Azurite), then a whole group moved by configuration.

The assets here are tiny stand-ins for bronze/silver assets; they run through Dagster exactly as
the real ones do (``materialize`` / ``execute_in_process``), so metadata, partition mapping and
input annotations are Dagster's own.
"""

import datetime as dt
import json
import logging
import re
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Optional

import dagster as dg
import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datalake.extract import Extraction, ExtractionStats, Window, WindowKind
from datalake.io_managers import BronzeIOManager, DuckDBPathInputManager, ParquetIOManager
from datalake.lake import DuckDBResource, ParquetPaths, bronze_file, write_output, write_parquet
from datalake.specs import Cursor, CursorKind, TableSpec
from datalake.storage import (
    FOOTER_PREFETCH_BYTES,
    INPROGRESS_MARKER,
    ArrowReads,
    LakeStorage,
    ProtocolAlias,
    _PositionalFile,
)
from datalake.watermark import WATERMARK_KEY
from datalake_tests.helpers import REPO
from datalake_tests.lake_roots import (
    CONTAINER,
    ROOT_KINDS,
    LakeRoot,
    azure_url,
    ensure_container,
    key_resource,
    make_root,
)
from datalake_tests.services import AzuriteServer


@pytest.fixture(params=ROOT_KINDS)
def lake_root(request: pytest.FixtureRequest, tmp_path: Path) -> LakeRoot:
    """Local tmp path, then Azurite: every test using it runs on both."""
    return make_root(request.param, tmp_path, request)


RUN_A, RUN_B = str(uuid.UUID(int=0xA)), str(uuid.UUID(int=0xB))
RUN_X, RUN_Y = str(uuid.UUID(int=0xC)), str(uuid.UUID(int=0xD))
DAYS = ["2025-01-01", "2025-01-02", "2025-01-03"]
DAILY = dg.DailyPartitionsDefinition(start_date="2025-01-01", end_date="2025-01-10")
SPEC = TableSpec(
    schema="v3_test",  # type: ignore[call-arg]  (alias of source_schema)
    table="events",
    primary_key=("id",),
    cursor=Cursor(column="id", kind=CursorKind.INTEGER),
    date_column="ts",
)
BASE_SCHEMA = pa.schema(
    [("id", pa.int64()), ("ts", pa.timestamp("us", tz="UTC")), ("amount", pa.decimal128(18, 4))]
)


def _batch(ids: range, schema: pa.Schema = BASE_SCHEMA) -> pa.RecordBatch:
    day0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    columns: dict[str, list[Any]] = {
        "id": list(ids),
        "ts": [day0 + dt.timedelta(minutes=i) for i in ids],
        "amount": [Decimal(f"{i}.25") for i in ids],
    }
    if "note" in schema.names:
        columns["note"] = [f"n{i}" for i in ids]
    return pa.RecordBatch.from_pydict(columns, schema=schema)


class BronzeRun(dg.Config):
    # Row counts of the batches this run extracts (0 = an empty batch), ids from first_id on.
    batches: list[int]
    first_id: int = 0
    with_note: bool = False  # a column added at the source later (schema drift)
    incremental: bool = True
    pause_seconds: float = 0.0  # between batches: a slow source, to overlap concurrent runs


def _extraction(config: BronzeRun) -> Extraction:
    schema = BASE_SCHEMA.append(pa.field("note", pa.string())) if config.with_note else BASE_SCHEMA
    stats = ExtractionStats()
    window = (
        Window(WindowKind.INCREMENTAL, column="id", lo=config.first_id)
        if config.incremental
        else Window(WindowKind.BACKFILL, column="ts")
    )
    resolved: dict[str, Any] = {"lo": config.first_id}

    def batches() -> Iterator[pa.RecordBatch]:
        start = config.first_id
        for n in config.batches:
            stats.rows += n
            stats.batches += 1
            yield _batch(range(start, start + n), schema)
            start += n
            if config.pause_seconds:
                time.sleep(config.pause_seconds)
        resolved["hi"] = start  # known once the read is done, as in the real extractor

    return Extraction(
        spec=SPEC,
        schema=schema,
        batches=batches(),
        window=window,
        stats=stats,
        source="test",
        resolved=resolved,
    )


@dg.asset(
    key=["bronze", "events"], partitions_def=DAILY, io_manager_key="bronze_io_manager", group_name="bronze"
)
def bronze_events(config: BronzeRun) -> Extraction:
    return _extraction(config)


def _resources(root: LakeRoot, **extra: Any) -> dict[str, Any]:
    roots = {"bronze_io_manager": root.sub("bronze"), "silver_io_manager": root.sub("silver")}
    return {
        "bronze_io_manager": BronzeIOManager(root=roots["bronze_io_manager"], azure=root.azure),
        "silver_io_manager": ParquetIOManager(
            root=roots["silver_io_manager"], azure=root.azure, row_group_size=1000
        ),
        "duckdb_path_input_manager": DuckDBPathInputManager(roots=roots, azure=root.azure),
        "duckdb_resource": DuckDBResource(memory_limit="1GB"),
        **extra,
    }


def _bronze(
    root: LakeRoot,
    day: str,
    run: BronzeRun,
    *,
    run_id: str | None = None,
    instance: dg.DagsterInstance | None = None,
) -> dg.AssetMaterialization:
    job = dg.Definitions(
        assets=[bronze_events], resources=_resources(root)
    ).resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        partition_key=day,
        run_id=run_id,
        instance=instance,
        run_config=dg.RunConfig(ops={"bronze__events": run}),
    )
    (event,) = result.get_asset_materialization_events()
    return event.materialization


def _meta(materialization: dg.AssetMaterialization, key: str) -> Any:
    return materialization.metadata[key].value


def _storage(root: LakeRoot, group: str) -> LakeStorage:
    return LakeStorage(root.sub(group), root.azure)


# --- bronze ---------------------------------------------------------------------------------


def test_bronze_one_file_per_run_streamed_and_retries_replace_only_their_own(lake_root: LakeRoot) -> None:
    storage = _storage(lake_root, "bronze")
    first = _bronze(lake_root, DAYS[0], BronzeRun(batches=[5, 0, 7, 3]), run_id=RUN_A)
    relative = bronze_file("events", DAYS[0], RUN_A)
    assert relative == f"events/ingestion_date=2025-01-01/events_{RUN_A}.parquet"
    footer = storage.read_metadata(relative)
    assert (footer.num_rows, footer.num_row_groups) == (15, 3)  # one row group per non-empty batch
    assert footer.row_group(0).column(0).compression == "ZSTD"
    assert footer.row_group(0).column(0).statistics.has_min_max
    assert _meta(first, "dagster/uri") == storage.uri(relative)
    assert _meta(first, "dagster/row_count") == 15
    assert _meta(first, "datalake/bytes_written") == storage.size(relative) > 0
    assert [c.name for c in _meta(first, "dagster/column_schema").columns] == ["id", "ts", "amount"]
    assert [c.type for c in _meta(first, "dagster/column_schema").columns][2] == "decimal128(18, 4)"
    assert (_meta(first, "datalake/window_kind"), _meta(first, "datalake/window_hi")) == ("incremental", "15")
    assert _meta(first, WATERMARK_KEY) == "15"  # committed with the file in place

    second = _bronze(lake_root, DAYS[0], BronzeRun(batches=[4], first_id=15), run_id=RUN_B)
    other = bronze_file("events", DAYS[0], RUN_B)
    other_bytes = storage.open_read(other).read()
    assert _meta(second, "dagster/row_count") == 4

    # A retry of run A (same run id) replaces run A's file only.
    _bronze(lake_root, DAYS[0], BronzeRun(batches=[2], incremental=False), run_id=RUN_A)
    assert storage.list_files("events/") == sorted([relative, other])
    assert storage.read_metadata(relative).num_rows == 2
    assert storage.open_read(other).read() == other_bytes
    backfill = _bronze(lake_root, DAYS[1], BronzeRun(batches=[2], incremental=False))
    assert WATERMARK_KEY not in backfill.metadata  # stateless windows commit no watermark


def test_row_groups_end_at_the_byte_bound_as_well_as_the_row_count(lake_root: LakeRoot) -> None:
    storage = _storage(lake_root, "bronze")
    schema = pa.schema([("id", pa.int64()), ("doc", pa.string())])

    def documents() -> Iterator[pa.RecordBatch]:  # 12 batches of 2 rows, ~200 KB each
        for i in range(12):
            yield pa.record_batch(
                [pa.array([2 * i, 2 * i + 1]), pa.array(["x" * 100_000] * 2)], schema=schema
            )

    def row_groups(relative: str) -> list[int]:
        footer = storage.read_metadata(relative)
        return [footer.row_group(i).num_rows for i in range(footer.num_row_groups)]

    write_parquet(
        storage, "docs/bounded.parquet", schema, documents(), row_group_size=1000, row_group_bytes=450_000
    )
    write_parquet(storage, "docs/rows_only.parquet", schema, documents(), row_group_size=1000)
    assert row_groups("docs/bounded.parquet") == [6, 6, 6, 6]  # three batches reach 450 KB
    assert row_groups("docs/rows_only.parquet") == [24]
    table = pq.read_table(storage.reader_path("docs/bounded.parquet"), filesystem=storage.fs)
    assert table.column("id").to_pylist() == list(range(24))

    # A Table or DataFrame output is one batch of up to row_group_size rows: bounded by bytes too.
    whole = pa.Table.from_batches(list(documents()), schema=schema).combine_chunks()
    write_output(storage, "docs/table.parquet", whole, row_group_size=1000, row_group_bytes=450_000)
    assert max(row_groups("docs/table.parquet")) <= 5 and sum(row_groups("docs/table.parquet")) == 24
    frame = pl.from_arrow(whole)
    write_output(storage, "docs/frame.parquet", frame, row_group_size=1000, row_group_bytes=450_000)
    assert max(row_groups("docs/frame.parquet")) <= 5 and sum(row_groups("docs/frame.parquet")) == 24


def test_bronze_loads_frames_by_annotation(lake_root: LakeRoot) -> None:
    _bronze(lake_root, DAYS[0], BronzeRun(batches=[3]))
    _bronze(lake_root, DAYS[0], BronzeRun(batches=[2], first_id=3))
    _bronze(lake_root, DAYS[1], BronzeRun(batches=[4], first_id=5, with_note=True))
    seen: dict[str, Any] = {}
    bronze_in = dg.AssetIn(key=["bronze", "events"], input_manager_key="bronze_io_manager")

    @dg.asset(ins={"events": bronze_in}, io_manager_key="silver_io_manager")
    def lazy_all(events: pl.LazyFrame) -> pl.DataFrame:
        seen["lazy"] = events
        return events.collect()

    @dg.asset(ins={"events": bronze_in}, io_manager_key="silver_io_manager")
    def eager_by_day(events: dict[str, pl.DataFrame]) -> pl.DataFrame:
        seen["by_day"] = events
        return pl.DataFrame({"n": [len(events)]})

    @dg.asset(ins={"events": bronze_in}, io_manager_key="silver_io_manager")
    def unannotated(events) -> pl.DataFrame:  # no annotation: the IO manager picks the shape
        seen["unannotated"] = events
        return pl.DataFrame({"n": [len(events)]})

    @dg.asset(ins={"events": bronze_in}, partitions_def=DAILY, io_manager_key="silver_io_manager")
    def one_day(events: dict[str, pl.DataFrame]) -> pl.DataFrame:
        seen["one_day"] = events
        return pl.DataFrame({"n": [len(events)]})

    result = dg.materialize(
        [bronze_events, lazy_all, eager_by_day, unannotated],
        resources=_resources(lake_root),
        selection=[lazy_all, eager_by_day, unannotated],
    )
    assert result.success
    # Unannotated over several partitions: a dict, as the Parquet IO manager gives.
    assert isinstance(seen["unannotated"], dict) and set(DAYS) <= set(seen["unannotated"])
    # A dict asked for one day without files: that day, empty with the schema (not a bare frame).
    assert dg.materialize(
        [bronze_events, one_day], resources=_resources(lake_root), selection=[one_day], partition_key=DAYS[2]
    ).success
    assert list(seen["one_day"]) == [DAYS[2]] and seen["one_day"][DAYS[2]].columns[:3] == [
        "id",
        "ts",
        "amount",
    ]
    lazy = seen["lazy"]
    assert isinstance(lazy, pl.LazyFrame)
    plan = lazy.explain()
    assert "Parquet SCAN" in plan or "SCAN" in plan
    if lake_root.kind == "azure":
        assert "abfs://" in plan  # read lazily where it lies, not downloaded first
    frame = lazy.collect().sort("id")
    assert frame["id"].to_list() == list(range(9))
    assert frame["note"].null_count() == 5  # schema drift: the later column, NULL in older files
    by_day = seen["by_day"]
    assert {k: v.height for k, v in by_day.items() if v.height} == {DAYS[0]: 5, DAYS[1]: 4}
    assert all(isinstance(v, pl.DataFrame) for v in by_day.values())
    assert by_day[DAYS[2]].columns[:3] == ["id", "ts", "amount"]  # not materialized: empty, with schema


_CONCURRENT_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from dagster_azure.adls2 import ADLS2Key
    from datalake.azure import AzureBlobResource
    from datalake_tests.lake_roots import LakeRoot
    from datalake_tests.test_io_managers import BronzeRun, _bronze

    cfg = json.loads(sys.argv[1])
    azure = None
    if cfg["key"]:
        azure = AzureBlobResource(credential=ADLS2Key(key=cfg["key"]), blob_endpoint=cfg["endpoint"])
    root = LakeRoot(kind=cfg["kind"], url=cfg["url"], azure=azure)
    print("READY", flush=True)
    while not os.path.exists(cfg["go"]):  # both processes start writing at the same moment
        time.sleep(0.005)
    started = time.time()
    run = BronzeRun(batches=[2000] * 40, first_id=cfg["first_id"], pause_seconds=0.01)
    m = _bronze(root, cfg["day"], run, run_id=cfg["run_id"])
    print(json.dumps({"rows": m.metadata["dagster/row_count"].value, "span": [started, time.time()]}))
    """
)


def test_concurrent_runs_on_one_bronze_partition_both_land_intact(
    lake_root: LakeRoot, tmp_path: Path
) -> None:
    server = lake_root.server
    go = tmp_path / "go"
    children = []
    for i, run_id in enumerate((RUN_X, RUN_Y)):
        cfg = {
            "kind": lake_root.kind,
            "url": lake_root.url,
            "key": server.account_key if server else None,
            "endpoint": server.blob_endpoint if server else None,
            "day": DAYS[0],
            "first_id": i * 1_000_000,
            "run_id": run_id,
            "go": str(go),
        }
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", _CONCURRENT_CHILD, json.dumps(cfg)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for child in children:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "READY"
    go.touch()
    outputs = [child.communicate(timeout=300) for child in children]
    spans = []
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report["rows"] == 80_000
        spans.append(report["span"])
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, "the two runs did not overlap"
    storage = _storage(lake_root, "bronze")
    files = storage.list_files("events/")
    assert files == [bronze_file("events", DAYS[0], RUN_X), bronze_file("events", DAYS[0], RUN_Y)]
    for i, relative in enumerate(files):
        with storage.open_read(relative) as handle:
            table = pq.read_table(handle)  # a damaged file would not parse
        ids = table.column("id").to_pylist()
        assert ids == list(range(i * 1_000_000, i * 1_000_000 + 80_000))
        assert pq.ParquetFile(storage.open_read(relative)).metadata.num_row_groups == 40


# --- ParquetIOManager ------------------------------------------------------------------------


def _frame(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"k": list(range(n)), "name": [f"p{i % 7}" for i in range(n)], "x": [i * 0.5 for i in range(n)]}
    )


def test_parquet_io_manager_stores_every_output_type_and_loads_by_annotation(lake_root: LakeRoot) -> None:
    n = 2500

    @dg.asset(io_manager_key="silver_io_manager")
    def as_dataframe() -> pl.DataFrame:
        return _frame(n)

    @dg.asset(io_manager_key="silver_io_manager")
    def as_lazyframe() -> pl.LazyFrame:
        return _frame(n).lazy().with_columns(pl.col("x") * 1)

    @dg.asset(io_manager_key="silver_io_manager")
    def as_table() -> pa.Table:
        return _frame(n).to_arrow()

    @dg.asset(io_manager_key="silver_io_manager")
    def as_batch_stream() -> pa.RecordBatchReader:
        table = _frame(n).to_arrow()
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=300))

    @dg.asset(io_manager_key="silver_io_manager")
    def as_duckdb(duckdb_resource: DuckDBResource) -> duckdb.DuckDBPyRelation:
        con = duckdb_resource.connect()
        return con.sql(
            f"SELECT i::BIGINT AS k, 'p' || (i % 7) AS name, i * 0.5 AS x FROM range({n}) t(i) ORDER BY i"
        )

    producers = [as_dataframe, as_lazyframe, as_table, as_batch_stream, as_duckdb]
    loaded: dict[str, Any] = {}

    @dg.asset(
        ins={p.key.path[-1]: dg.AssetIn(p.key) for p in producers},
        io_manager_key="silver_io_manager",
    )
    def consumer(
        as_dataframe: pl.DataFrame,
        as_lazyframe: pl.LazyFrame,
        as_table: pl.DataFrame,
        as_batch_stream: pl.LazyFrame,
        as_duckdb: pl.DataFrame,
    ) -> pl.DataFrame:
        loaded.update(
            as_dataframe=as_dataframe,
            as_lazyframe=as_lazyframe,
            as_table=as_table,
            as_batch_stream=as_batch_stream,
            as_duckdb=as_duckdb,
        )
        return pl.DataFrame({"ok": [True]})

    result = dg.materialize([*producers, consumer], resources=_resources(lake_root))
    storage = _storage(lake_root, "silver")
    expected = _frame(n)
    for producer in producers:
        name = producer.key.path[-1]
        relative = f"{name}/{name}.parquet"
        value = loaded[name]
        assert isinstance(
            value, pl.LazyFrame if name in ("as_lazyframe", "as_batch_stream") else pl.DataFrame
        )
        frame = value.collect() if isinstance(value, pl.LazyFrame) else value
        assert frame.select("k", "name", "x").equals(expected), name
        footer = storage.read_metadata(relative)
        assert footer.num_rows == n
        assert all(footer.row_group(i).num_rows <= 1000 for i in range(footer.num_row_groups)), name
        assert footer.num_row_groups >= 3, name
        column = footer.row_group(0).column(0)
        assert column.compression == "ZSTD" and column.statistics.has_min_max, name
        (event,) = [
            e.materialization
            for e in result.get_asset_materialization_events()
            if e.materialization.asset_key == producer.key
        ]
        assert _meta(event, "dagster/uri") == storage.uri(relative)
        assert _meta(event, "dagster/row_count") == n
        assert _meta(event, "datalake/bytes_written") == storage.size(relative)
        assert [c.name for c in _meta(event, "dagster/column_schema").columns] == ["k", "name", "x"]
    if lake_root.kind == "azure":
        assert "abfs://" in loaded["as_lazyframe"].explain()  # lazy on Azure too


STATIC = dg.StaticPartitionsDefinition(["a", "b", "c"])


@dg.asset(partitions_def=STATIC, io_manager_key="silver_io_manager")
def dim(context: dg.AssetExecutionContext) -> pl.DataFrame:
    return pl.DataFrame({"part": [context.partition_key] * 3, "v": [1, 2, 3]})


def test_parquet_io_manager_loads_several_partitions_as_dict_and_missing_as_empty(
    lake_root: LakeRoot,
) -> None:
    resources = _resources(lake_root)
    instance = dg.DagsterInstance.ephemeral()
    for key in ("a", "b"):  # "c" never materialized
        dg.materialize([dim], resources=resources, partition_key=key, instance=instance)
    seen: dict[str, Any] = {}

    @dg.asset(ins={"dim": dg.AssetIn(key="dim")}, io_manager_key="silver_io_manager")
    def untyped(dim) -> pl.DataFrame:
        seen["untyped"] = dim
        return pl.DataFrame({"n": [1]})

    @dg.asset(ins={"dim": dg.AssetIn(key="dim")}, io_manager_key="silver_io_manager")
    def typed_dict(dim: dict[str, pl.LazyFrame]) -> pl.DataFrame:
        seen["typed_dict"] = dim
        return pl.DataFrame({"n": [1]})

    @dg.asset(ins={"dim": dg.AssetIn(key="dim")}, io_manager_key="silver_io_manager")
    def one_frame(dim: pl.DataFrame) -> pl.DataFrame:
        seen["one_frame"] = dim
        return pl.DataFrame({"n": [1]})

    result = dg.materialize(
        [dim, untyped, typed_dict, one_frame],
        resources=resources,
        selection=[untyped, typed_dict, one_frame],
        instance=instance,
    )
    assert result.success
    untyped_value = seen["untyped"]
    assert set(untyped_value) == {"a", "b", "c"}
    assert {k: v.height for k, v in untyped_value.items()} == {"a": 3, "b": 3, "c": 0}
    assert untyped_value["c"].schema == untyped_value["a"].schema  # the missing partition has the schema
    assert all(isinstance(v, pl.LazyFrame) for v in seen["typed_dict"].values())
    assert seen["one_frame"].sort("part")["part"].to_list() == ["a"] * 3 + ["b"] * 3


# --- DuckDB path input manager ---------------------------------------------------------------


def _bronze_days(root: LakeRoot, instance: dg.DagsterInstance | None = None) -> None:
    _bronze(root, DAYS[0], BronzeRun(batches=[3]), instance=instance)
    _bronze(root, DAYS[0], BronzeRun(batches=[2], first_id=3), instance=instance)
    _bronze(root, DAYS[1], BronzeRun(batches=[4], first_id=5, with_note=True), instance=instance)
    # DAYS[2]: never extracted


def test_an_input_mapped_to_no_upstream_partition_is_empty_with_the_schema(lake_root: LakeRoot) -> None:
    """Yesterday's partition of the first day (an offset mapping that allows it) is none: an empty
    frame with the upstream's schema, or an empty dict (it failed with ``cannot concat empty list``)."""
    daily = dg.DailyPartitionsDefinition(start_date="2025-01-01", end_date="2025-01-10")
    yesterday = dg.TimeWindowPartitionMapping(
        start_offset=-1, end_offset=-1, allow_nonexistent_upstream_partitions=True
    )
    seen: dict[str, Any] = {}

    @dg.asset(key=["silver", "daily_up"], partitions_def=daily, io_manager_key="silver_io_manager")
    def daily_up(context: dg.AssetExecutionContext) -> pl.DataFrame:
        return pl.DataFrame({"day": [context.partition_key], "n": [1]})

    @dg.asset(
        key=["silver", "daily_prev"],
        partitions_def=daily,
        io_manager_key="silver_io_manager",
        ins={"frame": dg.AssetIn(key=daily_up.key, partition_mapping=yesterday)},
    )
    def daily_prev(frame: pl.DataFrame) -> pl.DataFrame:
        seen["frame"] = frame
        return frame

    @dg.asset(
        key=["silver", "daily_prev_by_day"],
        partitions_def=daily,
        io_manager_key="silver_io_manager",
        ins={"by_day": dg.AssetIn(key=daily_up.key, partition_mapping=yesterday)},
    )
    def daily_prev_by_day(by_day: dict[str, pl.LazyFrame]) -> pl.DataFrame:
        seen["by_day"] = by_day
        return pl.DataFrame({"days": [len(by_day)]})

    resources = {"silver_io_manager": ParquetIOManager(root=lake_root.sub("silver"), azure=lake_root.azure)}
    assert dg.materialize([daily_up], resources=resources, partition_key="2025-01-01").success
    assets, downstream = [daily_up, daily_prev, daily_prev_by_day], [daily_prev, daily_prev_by_day]
    dg.materialize(assets, selection=downstream, resources=resources, partition_key="2025-01-02")
    assert seen["frame"].to_dicts() == [{"day": "2025-01-01", "n": 1}] and list(seen["by_day"]) == [
        "2025-01-01"
    ]
    dg.materialize(assets, selection=downstream, resources=resources, partition_key="2025-01-01")
    assert seen["frame"].height == 0 and seen["frame"].schema == {"day": pl.String, "n": pl.Int64}
    assert seen["by_day"] == {}


def test_path_input_manager_hands_one_range_or_all_partitions(lake_root: LakeRoot) -> None:
    _bronze_days(lake_root)
    storage = _storage(lake_root, "bronze")
    # Names readers must never pick up, in a partition directory (a killed write, a hidden file).
    for name in (f".events_zz.parquet{INPROGRESS_MARKER}123", ".hidden.parquet"):
        storage.fs.pipe(storage.path(f"events/ingestion_date={DAYS[0]}/{name}"), b"not parquet")
    seen: dict[str, Any] = {}
    events_in = dg.AssetIn(key=["bronze", "events"], input_manager_key="duckdb_path_input_manager")

    def probe(label: str, events: ParquetPaths, duckdb_resource: DuckDBResource) -> duckdb.DuckDBPyRelation:
        con = duckdb_resource.connect()
        relation = events.relation(con)
        seen[label] = {
            "files": events.files,
            "keys": events.partition_keys,
            "rows": relation.aggregate("count(*)").fetchall()[0][0],
            "columns": relation.columns,
            "plan": relation.filter("id = 3").select("amount").explain(),
            "notes": relation.filter("note IS NOT NULL").aggregate("count(*)").fetchall()[0][0]
            if "note" in relation.columns
            else None,
        }
        return relation.aggregate("count(*) AS n")

    @dg.asset(ins={"events": events_in}, io_manager_key="silver_io_manager")
    def all_days(events: ParquetPaths, duckdb_resource: DuckDBResource) -> duckdb.DuckDBPyRelation:
        return probe("all", events, duckdb_resource)

    @dg.asset(
        ins={"events": events_in},
        partitions_def=DAILY,
        io_manager_key="silver_io_manager",
        backfill_policy=dg.BackfillPolicy.single_run(),
        metadata={"datalake/partition_column": "day"},
    )
    def per_day(
        context: dg.AssetExecutionContext, events: ParquetPaths, duckdb_resource: DuckDBResource
    ) -> pl.DataFrame:
        label = "range" if len(context.partition_keys) > 1 else context.partition_key
        probe(label, events, duckdb_resource)
        return pl.DataFrame({"day": [dt.date.fromisoformat(k) for k in context.partition_keys]})

    resources = _resources(lake_root)
    dg.materialize([bronze_events, all_days], resources=resources, selection=[all_days])
    dg.materialize([bronze_events, per_day], resources=resources, selection=[per_day], partition_key=DAYS[0])
    dg.materialize([bronze_events, per_day], resources=resources, selection=[per_day], partition_key=DAYS[2])
    dg.materialize(
        [bronze_events, per_day],
        resources=resources,
        selection=[per_day],
        tags={"dagster/asset_partition_range_start": DAYS[0], "dagster/asset_partition_range_end": DAYS[2]},
    )

    assert len(seen["all"]["files"]) == 3 and seen["all"]["rows"] == 9
    assert seen["all"]["columns"] == ["id", "ts", "amount", "note"]  # unified by name
    assert seen["all"]["notes"] == 4
    assert all(INPROGRESS_MARKER not in f and "/." not in f for f in seen["all"]["files"])
    assert len(seen[DAYS[0]]["files"]) == 2 and seen[DAYS[0]]["rows"] == 5
    assert seen[DAYS[0]]["keys"] == (DAYS[0],)
    assert seen["range"]["keys"] == tuple(DAYS) and len(seen["range"]["files"]) == 3
    # The missing day: an empty relation with the table's schema, not an error.
    assert seen[DAYS[2]]["files"] == () and seen[DAYS[2]]["rows"] == 0
    assert seen[DAYS[2]]["columns"][:3] == ["id", "ts", "amount"]
    # DuckDB reads the files in place: the filter and the projection go into the Parquet scan.
    plan = seen[DAYS[0]]["plan"]
    assert "Parquet Scan" in plan or "PARQUET_SCAN" in plan
    assert "Filters:" in plan and "id=3" in plan.replace(" ", "")
    if lake_root.kind == "azure":
        assert all(f.startswith("abfs://") for f in seen["all"]["files"])


def test_path_input_finds_an_upstream_by_its_io_manager_key_not_its_key_prefix(tmp_path: Path) -> None:
    """``@asset(io_manager_key=…)`` under a key whose prefix names no layer (gold/…): the input
    reads from that IO manager's root, as a whole run and as a downstream-only run."""
    roots = {"silver_io_manager": str(tmp_path / "silver"), "revsci_io_manager": str(tmp_path / "gold")}

    @dg.asset(key=["gold", "usage"], io_manager_key="revsci_io_manager")
    def usage() -> pl.DataFrame:
        return pl.DataFrame({"v": [1, 2, 3]})

    @dg.asset(
        key=["silver", "usage_total"],
        io_manager_key="silver_io_manager",
        ins={"upstream": dg.AssetIn(key=usage.key, input_manager_key="duckdb_path_input_manager")},
    )
    def usage_total(upstream: ParquetPaths, duckdb_resource: DuckDBResource) -> pl.DataFrame:
        total = upstream.relation(duckdb_resource.connect()).aggregate("sum(v)").fetchall()[0][0]
        return pl.DataFrame({"total": [int(total)]})

    resources = {
        "silver_io_manager": ParquetIOManager(root=roots["silver_io_manager"]),
        "revsci_io_manager": ParquetIOManager(root=roots["revsci_io_manager"]),
        "duckdb_path_input_manager": DuckDBPathInputManager(roots=roots),
        "duckdb_resource": DuckDBResource(memory_limit="1GB"),
    }
    for selection in (None, [usage_total]):
        assert dg.materialize([usage, usage_total], resources=resources, selection=selection).success
        assert pl.read_parquet(tmp_path / "silver" / "usage_total" / "usage_total.parquet")[
            "total"
        ].to_list() == [6]
        (tmp_path / "silver" / "usage_total" / "usage_total.parquet").unlink()


def test_path_input_reads_time_as_interval_and_warns_of_decimals_beyond_duckdb(tmp_path: Path) -> None:
    """A TIME (bronze's duration[us]) is an INTERVAL to DuckDB and comes back exactly as duration[us];
    a DECIMAL beyond 38 digits cannot be DuckDB's: the step's log says so."""
    roots = {"silver_io_manager": str(tmp_path / "silver")}
    exact = Decimal("12345678901234567890.123456789012345678")
    times = [30_600_000_000, -5, None, 838 * 3_600_000_000 + 59 * 60_000_000 + 59_000_000]  # up to 838:59:59

    @dg.asset(key=["silver", "ledger"], io_manager_key="silver_io_manager")
    def ledger() -> pa.Table:
        return pa.table(
            {
                "id": [1, 2, 3, 4],
                "balance": pa.array([exact, None, None, None], pa.decimal256(65, 30)),
                "opens": pa.array(times, pa.duration("us")),
            }
        )

    @dg.asset(
        key=["silver", "reader"],
        io_manager_key="silver_io_manager",
        ins={"upstream": dg.AssetIn(key=ledger.key, input_manager_key="duckdb_path_input_manager")},
    )
    def reader(upstream: ParquetPaths, duckdb_resource: DuckDBResource) -> duckdb.DuckDBPyRelation:
        relation = upstream.relation(duckdb_resource.connect())
        types = dict(zip(relation.columns, map(str, relation.types), strict=True))
        assert types == {"id": "BIGINT", "balance": "DOUBLE", "opens": "INTERVAL"}
        return relation.project("id, opens, opens + INTERVAL 1 SECOND AS later")

    resources = {
        "silver_io_manager": ParquetIOManager(root=roots["silver_io_manager"]),
        "duckdb_path_input_manager": DuckDBPathInputManager(roots=roots),
        "duckdb_resource": DuckDBResource(memory_limit="1GB"),
    }
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([ledger, reader], resources=resources, instance=instance)
    warnings = [
        e.user_message
        for e in instance.all_logs(result.run_id)
        if e.level == logging.WARNING and "DuckDB reads" in e.user_message
    ]
    assert len(warnings) == 1, warnings
    assert (
        "column 'balance' is decimal256(65, 30): DuckDB reads decimals of more than 38 digits as DOUBLE"
        in (warnings[0])
    )
    written = pq.read_table(tmp_path / "silver" / "reader" / "reader.parquet").sort_by("id")
    assert written.schema.field("opens").type == pa.duration("us")
    assert written.column("opens").to_pylist() == pa.array(times, pa.duration("us")).to_pylist()
    assert written.column("later").to_pylist()[0] == dt.timedelta(hours=8, minutes=30, seconds=1)


def test_duckdb_outputs_hold_utc_instants_whatever_the_hosts_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB stamps instants with its session's zone, by default the host's: files written on a
    host in another zone did not read together with the others (nor with bronze's UTC)."""
    roots = {"silver_io_manager": str(tmp_path / "silver")}
    at = dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC)

    @dg.asset(key=["silver", "events"], io_manager_key="silver_io_manager")
    def events() -> pa.Table:
        return pa.table({"id": [1], "seen": pa.array([at], pa.timestamp("us", tz="UTC"))})

    @dg.asset(
        key=["silver", "later"],
        io_manager_key="silver_io_manager",
        ins={"upstream": dg.AssetIn(key=events.key, input_manager_key="duckdb_path_input_manager")},
    )
    def later(upstream: ParquetPaths, duckdb_resource: DuckDBResource) -> duckdb.DuckDBPyRelation:
        return upstream.relation(duckdb_resource.connect()).project(
            "id, seen, seen + INTERVAL 1 HOUR AS next"
        )

    resources = {
        "silver_io_manager": ParquetIOManager(root=roots["silver_io_manager"]),
        "duckdb_path_input_manager": DuckDBPathInputManager(roots=roots),
        "duckdb_resource": DuckDBResource(memory_limit="1GB"),
    }
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert duckdb.connect().sql("SELECT current_setting('TimeZone')").fetchall() == [
            ("America/New_York",)
        ]
        dg.materialize([events, later], resources=resources)
    finally:
        monkeypatch.undo()
        time.tzset()
    written = pq.read_table(tmp_path / "silver" / "later" / "later.parquet")
    assert (
        written.schema.field("seen").type == written.schema.field("next").type == pa.timestamp("us", tz="UTC")
    )
    assert written.column("next").to_pylist() == [at + dt.timedelta(hours=1)]


def test_an_interval_with_months_fails_naming_its_column(tmp_path: Path) -> None:
    @dg.asset(io_manager_key="silver_io_manager")
    def spans(duckdb_resource: DuckDBResource) -> duckdb.DuckDBPyRelation:
        return duckdb_resource.connect().sql("SELECT INTERVAL 1 MONTH AS billing_period")

    resources = {
        "silver_io_manager": ParquetIOManager(root=str(tmp_path / "silver")),
        "duckdb_resource": DuckDBResource(memory_limit="1GB"),
    }
    with pytest.raises(ValueError, match="column 'billing_period': an INTERVAL with months"):
        dg.materialize([spans], resources=resources)


@pytest.mark.azurite
@pytest.mark.parametrize("reader", ["arrow", "adlfs"])
def test_path_inputs_on_two_storage_accounts_are_read_from_their_own(
    azurite_server: AzuriteServer, reader: Literal["arrow", "adlfs"]
) -> None:
    """One step reads a root on each of two storage accounts, with one DuckDB connection.

    The roots have the same container and prefix; only the account tells them apart, and the
    first account also holds a table of the second one's name. DuckDB picks a registered
    filesystem by the path's protocol alone, so if both roots were read as ``abfs://`` the second
    input would silently be read from the first account.
    """
    import adlfs

    accounts = {"a": azurite_server, "b": azurite_server.second_account()}
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    azure = {side: key_resource(server, duckdb_reader=reader) for side, server in accounts.items()}
    roots = {side: azure_url(server, prefix) for side, server in accounts.items()}
    for server in accounts.values():
        ensure_container(server)
    schema = pa.schema([("source", pa.string()), ("value", pa.int64())])
    for side, table, source, value in (("a", "a", "a", 1), ("a", "b", "decoy", 9), ("b", "b", "b", 2)):
        write_parquet(
            LakeStorage(roots[side], azure[side]),
            f"totals_{table}/totals_{table}.parquet",
            schema,
            [pa.record_batch({"source": [source] * value, "value": [value] * value}, schema=schema)],
        )
    upstream = [dg.AssetSpec(key=f"totals_{side}") for side in accounts]  # the default role: io_manager
    seen: dict[str, Any] = {}

    @dg.asset(
        ins={side: dg.AssetIn(key=f"totals_{side}", input_manager_key=f"paths_{side}") for side in accounts},
        io_manager_key="out_io_manager",
    )
    def both(a: ParquetPaths, b: ParquetPaths, duckdb_resource: DuckDBResource) -> pl.DataFrame:
        con = duckdb_resource.connect()
        for side, paths in (("a", a), ("b", b)):
            seen[side] = (paths.files, paths.relation(con).fetchall())
        seen["reader"] = type(b.filesystem)
        return pl.DataFrame({"n": [1]})

    resources: dict[str, Any] = {
        f"paths_{side}": DuckDBPathInputManager(roots={"io_manager": roots[side]}, azure=azure[side])
        for side in accounts
    }
    resources |= {
        "out_io_manager": dg.InMemoryIOManager(),
        "duckdb_resource": DuckDBResource(memory_limit="1GB"),
    }
    assert dg.materialize([*upstream, both], selection=[both], resources=resources).success
    assert seen["a"][1] == [("a", 1)]
    assert seen["b"][1] == [("b", 2), ("b", 2)]
    assert seen["reader"] == (ArrowReads if reader == "arrow" else adlfs.AzureBlobFileSystem)
    # What the handle shows is the account-free URL (what fsspec and polars take with the filesystem).
    assert seen["b"][0] == (f"abfs://{CONTAINER}/{prefix}/totals_b/totals_b.parquet",)


@pytest.mark.azurite
def test_path_inputs_on_one_account_share_its_filesystem(azurite_server: AzuriteServer) -> None:
    """Inputs on one account get its one filesystem (one client, one token); each is read under a
    DuckDB alias of its own, which answers from that input's listing."""
    ensure_container(azurite_server)
    azure = key_resource(azurite_server)
    root = azure_url(azurite_server, f"t-{uuid.uuid4().hex[:12]}")
    schema = pa.schema([("value", pa.int64())])
    for name, rows in (("x", 1), ("y", 2)):
        write_parquet(
            LakeStorage(root, azure),
            f"{name}/{name}.parquet",
            schema,
            [pa.record_batch({"value": [rows] * rows}, schema=schema)],
        )
    seen: dict[str, Any] = {}

    @dg.asset(
        ins={name: dg.AssetIn(key=name, input_manager_key="paths") for name in ("x", "y")},
        io_manager_key="out_io_manager",
    )
    def both(x: ParquetPaths, y: ParquetPaths, duckdb_resource: DuckDBResource) -> pl.DataFrame:
        con = duckdb_resource.connect()
        seen["rows"] = [paths.relation(con).aggregate("count(*)").fetchall()[0][0] for paths in (x, y)]
        seen["shared"] = isinstance(x.filesystem, ArrowReads) and x.filesystem is y.filesystem
        seen["registered"] = con.list_filesystems()
        return pl.DataFrame({"n": [1]})

    resources = {
        "paths": DuckDBPathInputManager(roots={"io_manager": root}, azure=azure),
        "out_io_manager": dg.InMemoryIOManager(),
        "duckdb_resource": DuckDBResource(memory_limit="1GB"),
    }
    upstream = [dg.AssetSpec(key=name) for name in ("x", "y")]
    assert dg.materialize([*upstream, both], selection=[both], resources=resources).success
    assert seen["rows"] == [1, 2]
    assert seen["shared"]
    assert len(seen["registered"]) == 2


def _count_azure_requests(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts what DuckDB's reads ask Arrow's Azure client: metadata (each a request), opens
    (a request for the size), reads (one ranged request each)."""
    counts = {"metadata": 0, "opens": 0, "reads": 0}

    def counted(kind: str, call: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[kind] += 1
            return call(*args, **kwargs)

        return wrapper

    for name in ("info", "exists", "modified"):
        monkeypatch.setattr(ArrowReads, name, counted("metadata", getattr(ArrowReads, name)))
    monkeypatch.setattr(ArrowReads, "_open_read", counted("opens", ArrowReads._open_read))
    monkeypatch.setattr(_PositionalFile, "read_at", counted("reads", _PositionalFile.read_at))
    return counts


def test_a_path_input_on_azure_asks_azure_for_footers_at_once_and_nothing_the_listing_said(
    azurite_server: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB asked each file's existence, size and modification time ~7 times in a scan and read
    the footers one after the other to bind it (200 small files with 10 ms per request: 10.6 s).
    Now the listing answers the first, the footers are fetched on several threads before the bind,
    and a small file is read whole with its footer: one open and one read per file."""
    ensure_container(azurite_server)
    azure = key_resource(azurite_server)
    root = azure_url(azurite_server, f"t-{uuid.uuid4().hex[:12]}")
    storage = LakeStorage(root, azure)
    old = pa.schema([("id", pa.int64())])
    new = old.append(pa.field("note", pa.string()))
    for day in range(6):
        schema = old if day < 3 else new
        columns: dict[str, list[Any]] = {"id": [day * 10 + i for i in range(10)]}
        if schema is new:
            columns["note"] = [f"d{day}"] * 10
        write_parquet(
            storage, f"events/2025-01-0{day + 1}.parquet", schema, [pa.record_batch(columns, schema=schema)]
        )
    counts = _count_azure_requests(monkeypatch)
    seen: dict[str, Any] = {}

    @dg.asset(ins={"events": dg.AssetIn(input_manager_key="paths")}, io_manager_key="out_io_manager")
    def summary(events: ParquetPaths, duckdb_resource: DuckDBResource) -> pl.DataFrame:
        seen["prefetched"] = events.footers.prefetched_bytes if events.footers else 0
        con = duckdb_resource.connect()
        seen["row"] = events.relation(con).aggregate("count(*), sum(id), count(note)").fetchall()[0]
        return pl.DataFrame({"n": [1]})

    resources = {
        "paths": DuckDBPathInputManager(roots={"io_manager": root}, azure=azure),
        "out_io_manager": dg.InMemoryIOManager(),
        "duckdb_resource": DuckDBResource(memory_limit="1GB"),
    }
    upstream = dg.AssetSpec(
        key="events", partitions_def=dg.StaticPartitionsDefinition([f"2025-01-0{d + 1}" for d in range(6)])
    )
    assert dg.materialize([upstream, summary], selection=[summary], resources=resources).success
    assert seen["prefetched"] > 0
    assert seen["row"] == (60, sum(range(60)), 30)  # the column added later is read by name
    # Before: 42 questions and 30 opens for these 6 files.
    assert counts["metadata"] == 0
    assert counts["opens"] == 6
    # One read per file: its footer, the rest of so small a file with it (the schemas come from them).
    assert counts["reads"] == 6


def test_a_footer_longer_than_duckdb_reads_at_once_is_prefetched_whole(
    azurite_server: AzuriteServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DuckDB reads a footer as the file's last 16 KiB, then the rest of a longer one: both come
    from the prefetch, and binding the scan asks Azure nothing."""
    ensure_container(azurite_server)
    azure = key_resource(azurite_server)
    storage = LakeStorage(azure_url(azurite_server, f"t-{uuid.uuid4().hex[:12]}"), azure)
    table = pa.table({"id": pa.array(range(30_000), pa.int64()), "v": [str(i) for i in range(30_000)]})
    local = tmp_path / "long_footer.parquet"
    pq.write_table(table, local, row_group_size=100)  # 300 row groups: a long footer
    assert pq.read_metadata(local).serialized_size > FOOTER_PREFETCH_BYTES
    storage.fs.put(str(local), storage.path("t/long_footer.parquet"))
    files = storage.list_files("t")
    assert storage.scan_fs is not None
    alias = ProtocolAlias(storage.scan_fs, "prefetched", storage.listed(files))
    counts = _count_azure_requests(monkeypatch)
    alias.prefetch_footers(threads=2)
    assert (counts["opens"], counts["reads"]) == (1, 2)  # the first 16 KiB, then the rest
    con = DuckDBResource(memory_limit="1GB").connect()
    con.register_filesystem(alias)
    relation = con.read_parquet([f"prefetched://{storage.path(f)}" for f in files])
    assert relation.columns == ["id", "v"]
    assert (counts["opens"], counts["reads"]) == (1, 2)
    assert relation.aggregate("count(*), sum(id)").fetchall() == [(30_000, sum(range(30_000)))]
    assert counts["metadata"] == 0


@pytest.mark.parametrize("reader", ["arrow", "adlfs"])
def test_a_file_that_is_not_parquet_is_reported_by_duckdb_naming_it(
    azurite_server: AzuriteServer, reader: Literal["arrow", "adlfs"]
) -> None:
    """The footer prefetch leaves what it cannot read to DuckDB (adlfs raised a bare ValueError
    for an empty file, out of the prefetch)."""
    ensure_container(azurite_server)
    storage = LakeStorage(
        azure_url(azurite_server, f"t-{uuid.uuid4().hex[:12]}"), key_resource(azurite_server, reader)
    )
    storage.fs.pipe_file(storage.path("e/empty.parquet"), b"")
    files = storage.list_files("e")
    paths = ParquetPaths(
        dg.AssetKey("e"),
        tuple(storage.reader_path(f) for f in files),
        pa.schema([("id", pa.int64())]),
        filesystem=storage.scan_fs,
        footers=storage.footers(files),
    )
    with pytest.raises(duckdb.Error, match=re.escape("e/empty.parquet")):
        paths.relation(DuckDBResource(memory_limit="1GB").connect()).aggregate("count(*)").fetchall()


def test_a_file_replaced_after_its_listing_fails_the_read_by_name(azurite_server: AzuriteServer) -> None:
    """DuckDB would read a replaced file at the listed size's offsets: it fails, naming the file.
    (A file small enough to come whole with its footer is read as it was listed.)"""
    ensure_container(azurite_server)
    azure = key_resource(azurite_server)
    storage = LakeStorage(azure_url(azurite_server, f"t-{uuid.uuid4().hex[:12]}"), azure)
    schema = pa.schema([("id", pa.int64()), ("token", pa.string())])

    def batch(rows: int) -> pa.RecordBatch:  # incompressible: larger than the prefetched tail
        return pa.record_batch(
            {"id": list(range(rows)), "token": [uuid.uuid4().hex for _ in range(rows)]}, schema
        )

    write_parquet(storage, "t/a.parquet", schema, [batch(2000)])
    files = storage.list_files("t")
    assert storage.size(files[0]) > FOOTER_PREFETCH_BYTES
    paths = ParquetPaths(
        dg.AssetKey("t"),
        tuple(storage.reader_path(f) for f in files),
        schema,
        filesystem=storage.scan_fs,
        footers=storage.footers(files),
    )
    write_parquet(storage, "t/a.parquet", schema, [batch(3000)])
    con = DuckDBResource(memory_limit="1GB").connect()
    with pytest.raises(duckdb.Error, match=re.escape("t/a.parquet changed while it was being read")):
        paths.relation(con).aggregate("sum(id)").fetchall()


def test_an_empty_input_has_the_schema_of_the_last_written_file_not_the_last_named(
    lake_root: LakeRoot,
) -> None:
    """Within an ingestion date, runs' files sort by run id: the later run (a column added) may
    sort first. A missing day's empty input must still have the column."""
    early, late = "ffffffff-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"
    _bronze(lake_root, DAYS[1], BronzeRun(batches=[3]), run_id=early)
    time.sleep(1.1)  # modification times of a second's resolution (some filesystems) still differ
    _bronze(lake_root, DAYS[1], BronzeRun(batches=[2], first_id=3, with_note=True), run_id=late)
    seen: dict[str, Any] = {}

    @dg.asset(
        ins={"events": dg.AssetIn(key=["bronze", "events"], input_manager_key="duckdb_path_input_manager")},
        partitions_def=DAILY,
        io_manager_key="silver_io_manager",
    )
    def notes(events: ParquetPaths, duckdb_resource: DuckDBResource) -> duckdb.DuckDBPyRelation:
        relation = events.relation(duckdb_resource.connect())
        seen[events.partition_keys[0] if events.partition_keys else ""] = (
            len(events.files),
            relation.columns,
        )
        return relation.select("id, note")

    for day in (DAYS[1], DAYS[2]):  # the day with both files, then a day without any
        assert dg.materialize(
            [bronze_events, notes], resources=_resources(lake_root), selection=[notes], partition_key=day
        ).success
    assert seen == {
        DAYS[1]: (2, ["id", "ts", "amount", "note"]),
        DAYS[2]: (0, ["id", "ts", "amount", "note"]),
    }


def test_empty_and_never_materialized_upstreams_give_empty_inputs_with_schema(
    lake_root: LakeRoot, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}
    events_in = dg.AssetIn(key=["bronze", "events"], input_manager_key="duckdb_path_input_manager")

    @dg.asset(ins={"events": events_in}, io_manager_key="silver_io_manager")
    def reader(events: ParquetPaths, duckdb_resource: DuckDBResource) -> duckdb.DuckDBPyRelation:
        relation = events.relation(duckdb_resource.connect())
        seen["files"], seen["columns"], seen["types"] = (
            events.files,
            relation.columns,
            [str(t) for t in relation.types],
        )
        seen["rows"] = relation.aggregate("count(*)").fetchall()[0][0]
        return relation

    instance = dg.DagsterInstance.ephemeral()
    # 1. An empty partition: its file exists, with the schema and no rows.
    _bronze(lake_root, DAYS[0], BronzeRun(batches=[]), instance=instance)
    dg.materialize(
        [bronze_events, reader], resources=_resources(lake_root), selection=[reader], instance=instance
    )
    assert len(seen["files"]) == 1 and seen["rows"] == 0
    assert seen["columns"] == ["id", "ts", "amount"]
    assert seen["types"] == ["BIGINT", "TIMESTAMP WITH TIME ZONE", "DECIMAL(18,4)"]
    # The empty output of `reader` is a file with that schema too.
    silver = _storage(lake_root, "silver")
    assert silver.read_schema("reader/reader.parquet").names == ["id", "ts", "amount"]

    # 2. The group moved to a new root where nothing is materialized yet: the schema comes from the
    #    upstream's last recorded dagster/column_schema.
    moved = LakeRoot(
        kind=lake_root.kind, url=lake_root.url + "-moved", azure=lake_root.azure, server=lake_root.server
    )
    seen.clear()
    dg.materialize(
        [bronze_events, reader], resources=_resources(moved), selection=[reader], instance=instance
    )
    assert seen["files"] == () and seen["rows"] == 0
    assert seen["types"] == ["BIGINT", "TIMESTAMP WITH TIME ZONE", "DECIMAL(18,4)"]

    # 3. Never materialized anywhere and no declared schema: a clear failure, not an empty table
    #    with invented columns.
    with pytest.raises(dg.Failure, match="materialize it first"):
        dg.materialize([bronze_events, reader], resources=_resources(moved), selection=[reader])

    # 4. ... unless the upstream declares its schema in its definition.
    declared = dg.AssetSpec(
        key=["bronze", "events"],
        metadata={"dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn("id", "int64")])},
    ).with_io_manager_key("bronze_io_manager")
    seen.clear()
    dg.materialize([declared, reader], resources=_resources(moved), selection=[reader])
    assert seen["columns"] == ["id"] and seen["rows"] == 0


# --- a whole group moved by configuration -----------------------------------------------------


@pytest.mark.azurite
def test_group_moves_to_azure_by_configuration_alone(
    azurite_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every group on local disk; then silver + Rev-Sci on Azurite; then bronze too.

    Only the DATALAKE_ROOT_* variables (plus the Azure credential and endpoint) change; the asset
    code, jobs and definitions are the project's own. Every output is identical in all three.
    """
    from datalake.cli import run_downstream
    from datalake.definitions import BRONZE_JOB, build_definitions
    from datalake.settings import resolve_settings
    from datalake_tests.lake_roots import azure_url, ensure_container, key_resource

    ensure_container(azurite_server)
    prefix = f"moved-{uuid.uuid4().hex[:8]}"
    base = {
        "DATALAKE_DEMO_DIR": str(tmp_path / "demo_source"),
        "DATALAKE_DEMO_CDR_ROWS": "1500",
        "DATALAKE_EXTRACT_LAG_SECONDS": "0",
        "DATALAKE_ROOT_BRONZE": str(tmp_path / "lake" / "bronze"),
        "DATALAKE_ROOT_SILVER": str(tmp_path / "lake" / "silver"),
        "DATALAKE_ROOT_VANGUARD_WHOLESALE": str(tmp_path / "lake" / "vanguard_wholesale"),
    }
    # The secret reaches the resource as an EnvVar, resolved from the process environment at launch.
    monkeypatch.setenv("DATALAKE_AZURE_ACCOUNT_KEY", azurite_server.account_key)
    azure_env = {
        "DATALAKE_AZURE_ACCOUNT_KEY": azurite_server.account_key,
        "DATALAKE_AZURE_BLOB_ENDPOINT": azurite_server.blob_endpoint,
    }
    configurations = {
        "local": base,
        "silver_on_azure": {
            **base,
            **azure_env,
            "DATALAKE_ROOT_SILVER": azure_url(azurite_server, f"{prefix}/silver"),
            "DATALAKE_ROOT_VANGUARD_WHOLESALE": azure_url(azurite_server, f"{prefix}/vanguard_wholesale"),
        },
        "all_on_azure": {
            **base,
            **azure_env,
            "DATALAKE_ROOT_BRONZE": azure_url(azurite_server, f"{prefix}/bronze"),
            "DATALAKE_ROOT_SILVER": azure_url(azurite_server, f"{prefix}/silver2"),
            "DATALAKE_ROOT_VANGUARD_WHOLESALE": azure_url(azurite_server, f"{prefix}/vanguard_wholesale2"),
        },
    }
    read_options = key_resource(azurite_server).polars_storage_options()
    outcomes: dict[str, dict[tuple[str, str], pl.DataFrame]] = {}
    for name, env in configurations.items():
        settings = resolve_settings(env)
        defs = build_definitions(settings)
        instance = dg.DagsterInstance.ephemeral()
        today = dt.datetime.now(settings.tz).date()
        if name != "silver_on_azure":  # silver_on_azure reads the local bronze the first run wrote
            bronze = defs.resolve_job_def(BRONZE_JOB).execute_in_process(
                partition_key=today.isoformat(), instance=instance
            )
            bronze_uris = [
                str(e.materialization.metadata["dagster/uri"].value)
                for e in bronze.get_asset_materialization_events()
            ]
            assert bronze_uris and all(u.startswith(env["DATALAKE_ROOT_BRONZE"]) for u in bronze_uris)
        rows = run_downstream(
            defs, settings, instance, first_day=today - dt.timedelta(days=3), last_day=today
        )
        frames: dict[tuple[str, str], pl.DataFrame] = {}
        for asset, partition, count, uri in rows:
            group = "VANGUARD_WHOLESALE" if asset.startswith("revsci/") else "SILVER"
            assert uri.startswith(env[f"DATALAKE_ROOT_{group}"]), (name, asset, uri)
            frame = pl.read_parquet(uri, storage_options=read_options if uri.startswith("abfs://") else None)
            assert frame.height == count
            frames[(asset, partition)] = frame
        outcomes[name] = frames
    local = outcomes["local"]
    assert local[("silver/fact_invoice", "-")].height > 0
    assert any(asset == "revsci/billing_usage_aggregated" and f.height for (asset, _), f in local.items())

    def comparable(frame: pl.DataFrame) -> pl.DataFrame:
        # Lineage (run id, extraction time) differs when bronze is extracted again; row order of
        # unordered outputs is not part of the result.
        data = frame.select([c for c in frame.columns if not c.startswith("_datalake")])
        return data.sort(data.columns, nulls_last=True)

    for name in ("silver_on_azure", "all_on_azure"):
        assert outcomes[name].keys() == local.keys()
        for key, frame in local.items():
            assert comparable(outcomes[name][key]).equals(comparable(frame)), (name, key)


def test_an_upstream_without_files_is_empty_with_its_exact_nested_schema(tmp_path: Path) -> None:
    """No file left (a root moved): the empty input is rebuilt from the last materialization's
    metadata, exactly, structs, maps and named list items included."""
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("tags", pa.list_(pa.field("l", pa.int32()))),
            ("address", pa.struct([("city", pa.string()), ("zip", pa.int32())])),
            ("attrs", pa.map_(pa.string(), pa.float64())),
        ]
    )
    roots = {"silver_io_manager": str(tmp_path / "silver")}
    seen: dict[str, Any] = {}

    @dg.asset(key=["silver", "nested"], io_manager_key="silver_io_manager")
    def nested() -> pa.Table:
        return pa.table(
            {
                "id": [1],
                "tags": [[1, 2]],
                "address": [{"city": "Bonn", "zip": 53111}],
                "attrs": [[("a", 1.0)]],
            },
            schema=schema,
        )

    @dg.asset(ins={"upstream": dg.AssetIn(key=nested.key, input_manager_key="duckdb_path_input_manager")})
    def reader(upstream: ParquetPaths) -> None:
        seen["schema"], seen["files"] = upstream.schema, upstream.files

    resources = {
        "silver_io_manager": ParquetIOManager(root=roots["silver_io_manager"]),
        "duckdb_path_input_manager": DuckDBPathInputManager(roots=roots),
    }
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([nested], resources=resources, instance=instance).success
    (tmp_path / "silver" / "nested" / "nested.parquet").unlink()
    assert dg.materialize(
        [nested, reader], resources=resources, instance=instance, selection=[reader]
    ).success
    assert seen["files"] == ()
    assert seen["schema"].names == schema.names and seen["schema"].types == schema.types


@pytest.fixture
def own_azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    """An Azurite of this test's own, which it may stop (the session's is shared)."""
    from datalake_tests.conftest import _serve  # pyright: ignore[reportPrivateUsage]
    from datalake_tests.services import start_azurite

    yield from _serve(start_azurite, "azurite-own", tmp_path_factory)


@pytest.mark.azurite
def test_a_sas_token_never_reaches_the_event_log_when_storage_fails_mid_step(
    own_azurite: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arrow's Azure client names the container URL, SAS and all, in its errors; DuckDB and Dagster
    would carry that text into the run's failure events (the UI, PostgreSQL)."""
    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

    from datalake.definitions import build_resources
    from datalake.settings import resolve_settings

    server = own_azurite
    BlobServiceClient.from_connection_string(server.connection_string).create_container("lake")
    token = generate_container_sas(
        server.account_name,
        "lake",
        account_key=server.account_key,
        permission=ContainerSasPermissions(read=True, write=True, list=True, create=True, delete=True),
        expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    signature = next(p for p in token.split("&") if p.startswith("sig="))[4:]
    monkeypatch.setenv("DATALAKE_AZURE_SAS_TOKEN", token)
    root = "abfs://lake@devstoreaccount1.dfs.core.windows.net"
    settings = resolve_settings(
        {
            "DATALAKE_ROOT_BRONZE": f"{root}/bronze",
            "DATALAKE_ROOT_SILVER": f"{root}/silver",
            "DATALAKE_ROOT_VANGUARD_WHOLESALE": f"{root}/vw",
            "DATALAKE_AZURE_SAS_TOKEN": token,
            "DATALAKE_AZURE_BLOB_ENDPOINT": server.blob_endpoint,
        }
    )
    resources = build_resources(settings)

    @dg.asset(key=["silver", "up"], io_manager_key="silver_io_manager")
    def up() -> pl.DataFrame:
        # Larger than the footer prefetch's tail: the scan reads it from the account.
        return pl.DataFrame({"x": [uuid.uuid4().hex for _ in range(2000)]})

    @dg.asset(
        key=["silver", "down"],
        io_manager_key="silver_io_manager",
        ins={"up": dg.AssetIn(key=up.key, input_manager_key="duckdb_path_input_manager")},
    )
    def down(up: ParquetPaths, duckdb_resource: DuckDBResource) -> pl.DataFrame:
        server.stop()  # the account becomes unreachable after the input was listed
        return up.relation(duckdb_resource.connect()).pl()

    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([up, down], resources=resources, selection=[up], instance=instance).success
    result = dg.materialize(
        [up, down], resources=resources, selection=[down], instance=instance, raise_on_error=False
    )
    assert not result.success
    logs = [repr(entry) for entry in instance.all_logs(result.run_id)]
    assert not [text for text in logs if signature in text]
    failures = [text for text in logs if "STEP_FAILURE" in text]
    assert failures and "?<redacted>" in failures[0]  # the reader's error, its query redacted


def test_an_optional_frame_annotation_loads_that_frame(tmp_path: Path) -> None:
    """``pl.LazyFrame | None`` (or ``Optional[…]``) is a LazyFrame input, not a collected DataFrame
    that Dagster's type check then refuses."""
    resources = {"silver_io_manager": ParquetIOManager(root=str(tmp_path / "silver"))}
    got: dict[str, Any] = {}

    @dg.asset(key=["silver", "flat"], io_manager_key="silver_io_manager")
    def flat() -> pl.DataFrame:
        return pl.DataFrame({"x": [1, 2]})

    @dg.asset(io_manager_key="silver_io_manager")
    def lazy_or_none(flat: pl.LazyFrame | None) -> pl.DataFrame:
        got["lazy_or_none"] = flat
        return pl.DataFrame({"n": [1]})

    @dg.asset(io_manager_key="silver_io_manager")
    def optional_frame(flat: Optional[pl.DataFrame]) -> pl.DataFrame:  # noqa: UP045 - the spelling under test
        got["optional_frame"] = flat
        return pl.DataFrame({"n": [1]})

    assert dg.materialize([flat, lazy_or_none, optional_frame], resources=resources).success
    assert isinstance(got["lazy_or_none"], pl.LazyFrame)
    assert isinstance(got["optional_frame"], pl.DataFrame)
    assert got["lazy_or_none"].collect()["x"].to_list() == [1, 2]
