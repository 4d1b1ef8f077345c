"""Single-run range backfills: one output for a partition range → one file per partition.

Dagster's own UPath IO managers refuse a multi-partition output; ``ParquetIOManager`` splits it by
the column named in the asset's ``datalake/partition_column`` metadata, records each partition's
row count on that partition's materialization, and writes empty partitions as empty files.
"""

import datetime as dt
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import polars as pl
import pyarrow as pa
import pytest

from datalake.io_managers import BronzeIOManager, DuckDBPathInputManager, ParquetIOManager
from datalake.lake import PARTITION_COLUMN_KEY, DuckDBResource, ParquetPaths, bronze_file, write_parquet
from datalake.storage import LakeStorage
from datalake_tests.lake_roots import ROOT_KINDS, LakeRoot, make_root

DAILY = dg.DailyPartitionsDefinition(start_date="2025-03-01", end_date="2025-04-01")
RANGE = [f"2025-03-{d:02d}" for d in range(1, 11)]  # 10 partitions
EMPTY_DAY = "2025-03-07"  # no CDRs that day
RANGE_TAGS = {"dagster/asset_partition_range_start": RANGE[0], "dagster/asset_partition_range_end": RANGE[-1]}
CDR_SCHEMA = pa.schema(
    [
        ("cdr_id", pa.int64()),
        ("partner_id", pa.int32()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("duration_seconds", pa.int32()),
    ]
)


@pytest.fixture(params=ROOT_KINDS)
def lake_root(request: pytest.FixtureRequest, tmp_path: Path) -> LakeRoot:
    """Local tmp path, then Azurite: every test using it runs on both."""
    return make_root(request.param, tmp_path, request)


def _cdrs_per_day(day: str) -> int:
    return 0 if day == EMPTY_DAY else 5 + int(day[-2:])


def _seed_bronze(root: LakeRoot) -> dict[str, int]:
    """Bronze CDR files for the range and for one day after it; returns rows per day."""
    storage = LakeStorage(root.sub("bronze"), root.azure)
    counts: dict[str, int] = {}
    next_id = 0
    for day in [*RANGE, "2025-03-11"]:
        n = _cdrs_per_day(day)
        start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
        ids = list(range(next_id, next_id + n))
        next_id += n
        batch = pa.RecordBatch.from_pydict(
            {
                "cdr_id": ids,
                "partner_id": [i % 3 for i in ids],
                "started_at": [start + dt.timedelta(minutes=37 * k) for k in range(n)],
                "duration_seconds": [10 + i for i in ids],
            },
            schema=CDR_SCHEMA,
        )
        write_parquet(storage, bronze_file("billing_cdr", day, "seed"), CDR_SCHEMA, [batch])
        counts[day] = n
    return counts


BRONZE_CDR = dg.AssetSpec(key=["bronze", "billing_cdr"], partitions_def=DAILY).with_io_manager_key(
    "bronze_io_manager"
)
SEEN: dict[str, Any] = {}


@dg.asset(
    key=["silver", "cdr_daily"],
    partitions_def=DAILY,
    backfill_policy=dg.BackfillPolicy.single_run(),
    io_manager_key="silver_io_manager",
    ins={
        "billing_cdr": dg.AssetIn(
            key=["bronze", "billing_cdr"], input_manager_key="duckdb_path_input_manager"
        )
    },
    metadata={PARTITION_COLUMN_KEY: "usage_date"},
)
def cdr_daily(
    context: dg.AssetExecutionContext, billing_cdr: ParquetPaths, duckdb_resource: DuckDBResource
) -> duckdb.DuckDBPyRelation:
    """One row per CDR of the range, in cdr_id order, with its usage day: one query for the range."""
    SEEN["run_keys"] = list(context.partition_keys)
    SEEN["files"] = billing_cdr.files
    con = duckdb_resource.connect()
    billing_cdr.view(con, "cdr")
    return con.sql(
        "SELECT CAST(timezone('UTC', started_at) AS DATE) AS usage_date, cdr_id, partner_id, duration_seconds "
        "FROM cdr ORDER BY cdr_id DESC"
    )


def _resources(root: LakeRoot) -> dict[str, Any]:
    roots = {"bronze_io_manager": root.sub("bronze"), "silver_io_manager": root.sub("silver")}
    return {
        "bronze_io_manager": BronzeIOManager(root=roots["bronze_io_manager"], azure=root.azure),
        "silver_io_manager": ParquetIOManager(root=roots["silver_io_manager"], azure=root.azure),
        "duckdb_path_input_manager": DuckDBPathInputManager(roots=roots, azure=root.azure),
        "duckdb_resource": DuckDBResource(memory_limit="1GB"),
    }


def test_ten_partition_single_run_backfill_writes_one_file_per_partition(lake_root: LakeRoot) -> None:
    counts = _seed_bronze(lake_root)
    SEEN.clear()
    result = dg.materialize(
        [BRONZE_CDR, cdr_daily], resources=_resources(lake_root), selection=[cdr_daily], tags=RANGE_TAGS
    )
    assert result.success
    assert SEEN["run_keys"] == RANGE  # one run, one step, the whole range
    assert len(SEEN["files"]) == len(RANGE)  # the range's bronze files only (not 2025-03-11)

    silver = LakeStorage(lake_root.sub("silver"), lake_root.azure)
    assert silver.list_files("cdr_daily/") == [f"cdr_daily/{day}.parquet" for day in RANGE]
    events = {
        str(e.materialization.partition): e.materialization for e in result.get_asset_materialization_events()
    }
    assert sorted(events) == RANGE
    for day in RANGE:
        relative = f"cdr_daily/{day}.parquet"
        source, options = silver.polars_source(relative)
        frame = pl.read_parquet(source, storage_options=options)
        # Exactly its own rows, in the order the query produced them.
        assert frame.height == counts[day], day
        assert set(frame["usage_date"].to_list()) <= {dt.date.fromisoformat(day)}
        assert frame["cdr_id"].to_list() == sorted(frame["cdr_id"].to_list(), reverse=True)
        assert frame.columns == ["usage_date", "cdr_id", "partner_id", "duration_seconds"]
        metadata = events[day].metadata
        assert metadata["dagster/partition_row_count"].value == counts[day]
        assert metadata["dagster/row_count"].value == counts[day]
        assert metadata["dagster/uri"].value == silver.uri(relative)
        assert metadata["datalake/bytes_written"].value == silver.size(relative)
        assert [c.name for c in metadata["dagster/column_schema"].value.columns] == frame.columns  # type: ignore[union-attr]
        assert metadata["datalake/range_row_count"].value == sum(counts[d] for d in RANGE)
    assert events[EMPTY_DAY].metadata["dagster/partition_row_count"].value == 0  # empty file, with schema


def test_range_output_with_rows_outside_the_range_fails_and_writes_nothing(lake_root: LakeRoot) -> None:
    @dg.asset(
        partitions_def=DAILY,
        backfill_policy=dg.BackfillPolicy.single_run(),
        io_manager_key="silver_io_manager",
        metadata={PARTITION_COLUMN_KEY: "day"},
    )
    def spills(context: dg.AssetExecutionContext) -> pl.DataFrame:
        days = [dt.date.fromisoformat(k) for k in context.partition_keys]
        return pl.DataFrame(
            {"day": [*days, days[-1] + dt.timedelta(days=1)], "v": list(range(len(days) + 1))}
        )

    result = dg.materialize([spills], resources=_resources(lake_root), tags=RANGE_TAGS, raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert failure is not None and "outside the targeted partitions" in str(failure.message) + str(
        failure.cause
    )
    assert LakeStorage(lake_root.sub("silver"), lake_root.azure).list_files("spills/") == []


def test_range_output_without_partition_column_is_refused_with_guidance(tmp_path: Path) -> None:
    root = make_root("local", tmp_path, None)  # type: ignore[arg-type]

    @dg.asset(
        partitions_def=DAILY,
        backfill_policy=dg.BackfillPolicy.single_run(),
        io_manager_key="silver_io_manager",
    )
    def unsplittable(context: dg.AssetExecutionContext) -> pl.DataFrame:
        return pl.DataFrame({"v": [1]})

    with pytest.raises(dg.Failure, match=PARTITION_COLUMN_KEY):
        dg.materialize([unsplittable], resources=_resources(root), tags=RANGE_TAGS)


def test_lazy_and_dict_range_outputs_split_too(lake_root: LakeRoot) -> None:
    @dg.asset(
        partitions_def=DAILY,
        backfill_policy=dg.BackfillPolicy.single_run(),
        io_manager_key="silver_io_manager",
        metadata={PARTITION_COLUMN_KEY: "ts"},
    )
    def lazy_events(context: dg.AssetExecutionContext) -> pl.LazyFrame:
        start = context.partition_time_window.start
        # A naive timestamp column, every 5 hours across the range: read in the partitions' zone.
        return pl.LazyFrame(
            {
                "ts": pl.datetime_range(
                    start.replace(tzinfo=None),
                    start.replace(tzinfo=None) + dt.timedelta(days=10),
                    "5h",
                    closed="left",
                    eager=True,
                )
            }
        ).with_columns(pl.int_range(pl.len()).alias("n"))

    @dg.asset(
        partitions_def=DAILY,
        backfill_policy=dg.BackfillPolicy.single_run(),
        io_manager_key="silver_io_manager",
    )
    def dict_events(context: dg.AssetExecutionContext) -> dict[str, pl.DataFrame]:
        return {
            key: pl.DataFrame({"key": [key] * i}) for i, key in enumerate(context.partition_keys) if i % 2
        }

    result = dg.materialize([lazy_events, dict_events], resources=_resources(lake_root), tags=RANGE_TAGS)
    silver = LakeStorage(lake_root.sub("silver"), lake_root.azure)
    rows = {
        (e.materialization.asset_key.path[-1], e.materialization.partition): e.materialization.metadata[
            "dagster/partition_row_count"
        ].value
        for e in result.get_asset_materialization_events()
    }
    # 10 days * 24 h / 5 h = 48 rows, placed by the hour of day.
    lazy_counts = [rows[("lazy_events", day)] for day in RANGE]
    assert sum(lazy_counts) == 48 and all(c in (4, 5) for c in lazy_counts)  # type: ignore[operator]
    assert [rows[("dict_events", day)] for day in RANGE] == [i if i % 2 else 0 for i in range(10)]
    assert len(silver.list_files("dict_events/")) == 10  # the keys it did not return: empty files
    assert silver.read_schema(f"dict_events/{RANGE[0]}.parquet").names == ["key"]


@pytest.mark.parametrize(
    ("timezone", "days"),
    [
        # Midnight does not exist on the second day: clocks jump from 00:00 to 01:00.
        ("Africa/Cairo", ["2025-04-24", "2025-04-25", "2025-04-26"]),
        ("America/Santiago", ["2024-09-07", "2024-09-08", "2024-09-09"]),
        ("UTC", ["2025-04-24", "2025-04-25", "2025-04-26"]),
    ],
)
def test_a_date_partition_column_finds_its_day_when_midnight_does_not_exist(
    tmp_path: Path, timezone: str, days: list[str]
) -> None:
    """A DATE names a local day; a day whose midnight was skipped by DST is still a partition."""
    daily = dg.DailyPartitionsDefinition(start_date=days[0], end_offset=3, timezone=timezone)

    @dg.asset(
        partitions_def=daily,
        backfill_policy=dg.BackfillPolicy.single_run(),
        io_manager_key="silver_io_manager",
        metadata={PARTITION_COLUMN_KEY: "usage_date"},
    )
    def usage(context: dg.AssetExecutionContext) -> pl.DataFrame:
        keys = context.partition_keys
        return pl.DataFrame(
            {
                "usage_date": [dt.date.fromisoformat(k) for k in keys for _ in range(2)],
                "n": range(2 * len(keys)),
            }
        )

    result = dg.materialize(
        [usage],
        resources={"silver_io_manager": ParquetIOManager(root=str(tmp_path))},
        tags={"dagster/asset_partition_range_start": days[0], "dagster/asset_partition_range_end": days[-1]},
    )
    assert result.success
    files = sorted((tmp_path / "usage").glob("*.parquet"))
    assert [f.stem for f in files] == days
    assert [pl.read_parquet(f)["usage_date"].to_list() for f in files] == [
        [dt.date.fromisoformat(d)] * 2 for d in days
    ]


def test_an_empty_dict_range_output_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    """No frame at all gives no schema for the range's empty files: a clear failure, not
    materializations without files."""

    @dg.asset(
        partitions_def=DAILY,
        backfill_policy=dg.BackfillPolicy.single_run(),
        io_manager_key="silver_io_manager",
    )
    def usage(context: dg.AssetExecutionContext) -> dict[str, pl.DataFrame]:
        return {}

    result = dg.materialize(
        [usage],
        resources={"silver_io_manager": ParquetIOManager(root=str(tmp_path))},
        tags=RANGE_TAGS,
        raise_on_error=False,
    )
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert failure is not None and "empty dict for partitions 2025-03-01..2025-03-10" in failure.message
    assert not result.get_asset_materialization_events()
    assert not list(tmp_path.rglob("*.parquet"))


def test_multi_partition_and_spaced_static_keys_are_stored_and_read(lake_root: LakeRoot) -> None:
    """A multi-partition key ('2025-03-01|eu') and a static key with a space name files too;
    both IO managers and the path input manager read them back."""
    multi = dg.MultiPartitionsDefinition(
        {
            "date": dg.DailyPartitionsDefinition(start_date="2025-03-01", end_date="2025-03-03"),
            "region": dg.StaticPartitionsDefinition(["eu", "north america"]),
        }
    )
    key = dg.MultiPartitionKey({"date": "2025-03-01", "region": "north america"})
    seen: dict[str, Any] = {}

    @dg.asset(key=["silver", "regional"], partitions_def=multi, io_manager_key="silver_io_manager")
    def regional(context: dg.AssetExecutionContext) -> pl.DataFrame:
        return pl.DataFrame({"partition": [context.partition_key] * 3})

    @dg.asset(
        key=["silver", "regional_paths"],
        partitions_def=multi,
        io_manager_key="silver_io_manager",
        ins={"paths": dg.AssetIn(key=regional.key, input_manager_key="duckdb_path_input_manager")},
    )
    def regional_paths(
        paths: ParquetPaths, duckdb_resource: DuckDBResource, regional: pl.DataFrame
    ) -> pl.DataFrame:
        seen["duckdb"] = paths.relation(duckdb_resource.connect()).aggregate("count(*)").fetchall()[0][0]
        seen["polars"] = regional.height
        return regional

    silver = lake_root.sub("silver")
    resources = {
        "silver_io_manager": ParquetIOManager(root=silver, azure=lake_root.azure),
        "duckdb_path_input_manager": DuckDBPathInputManager(
            roots={"silver_io_manager": silver}, azure=lake_root.azure
        ),
        "duckdb_resource": DuckDBResource(memory_limit="1GB"),
    }
    assert dg.materialize([regional, regional_paths], resources=resources, partition_key=str(key)).success
    assert seen == {"duckdb": 3, "polars": 3}
    storage = LakeStorage(silver, lake_root.azure)
    assert "regional/2025-03-01|north america.parquet" in storage.list_files("regional/")
