"""A source column's type changed between incremental bronze runs: old and new files read together.

Found by a review: silver took the columns' meaning from the newest file only (a TIME column dropped
since read as plain microseconds; a >38-digit decimal only in older files became DOUBLE without the
warning), and polars' relaxed concat read an INT column re-added as DATETIME as Int64 microseconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datalake.definitions import build_definitions
from datalake.io_managers import BronzeIOManager
from datalake.settings import BRONZE
from datalake_tests.bronze_harness import SCHEMA, BronzeHarness
from datalake_tests.conftest import bronze_harness
from datalake_tests.services import MariaDBServer

pytestmark = pytest.mark.mariadb


@pytest.fixture
def h(
    mariadb_server: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[BronzeHarness]:
    """What reads the files does not depend on the bronze reader: the default one only."""
    yield from bronze_harness(mariadb_server, tmp_path, monkeypatch, "auto")


def _table(h: BronzeHarness, columns: str, rows: str) -> None:
    h.sql(f"CREATE TABLE {SCHEMA}.t (id INT PRIMARY KEY, {columns}, updated_at DATETIME(6) NOT NULL)")
    h.sql(f"INSERT INTO {SCHEMA}.t VALUES {rows}")
    h.register(table="t", primary_key=["id"], cursor={"column": "updated_at"})
    time.sleep(0.05)
    assert h.run("t") is not None


def _run_after(h: BronzeHarness, *statements: str) -> None:
    for statement in statements:
        h.sql(statement)
    time.sleep(0.05)
    assert h.run("t") is not None
    assert len(list((h.root / "lake" / "bronze" / "t").rglob("*.parquet"))) == 2


def _silver(h: BronzeHarness) -> dg.ExecuteInProcessResult:
    key = dg.AssetKey(["silver", "t_current"])
    job = (
        build_definitions(h.settings())
        .resolve_implicit_global_asset_job_def()
        .get_subset(asset_selection={key})
    )
    return job.execute_in_process(instance=h.instance, raise_on_error=False)


def _silver_table(result: dg.ExecuteInProcessResult) -> pa.Table:
    assert result.success
    event = result.get_asset_materialization_events()[0].materialization
    return pq.read_table(str(event.metadata["dagster/uri"].value))


def _failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return str(failures[0].step_failure_data.error)


def _polars_load(h: BronzeHarness) -> pl.DataFrame:
    context = dg.build_input_context(
        asset_key=dg.AssetKey(["bronze", "t"]),
        dagster_type=dg.DagsterType(lambda _c, _v: True, name="frame", typing_type=pl.DataFrame),
    )
    return BronzeIOManager(root=h.settings().root(BRONZE)).load_input(context)


def test_a_time_column_dropped_since_stays_a_duration_in_silver(h: BronzeHarness) -> None:
    _table(h, "v TIME(6)", "(1, '25:00:00', NOW(6))")
    _run_after(h, f"ALTER TABLE {SCHEMA}.t DROP COLUMN v", f"INSERT INTO {SCHEMA}.t VALUES (2, NOW(6))")
    silver = _silver_table(_silver(h)).sort_by("id")
    assert silver.schema.field("v").type == pa.duration("us")  # was int64 90000000000
    assert silver.column("v").to_pylist()[0].total_seconds() == 25 * 3600


def test_a_wide_decimal_only_in_older_files_still_warns_it_is_read_as_double(h: BronzeHarness) -> None:
    _table(h, "v DECIMAL(40,2)", "(1, '1234567890123456789012345678901.25', NOW(6))")
    _run_after(
        h,
        f"ALTER TABLE {SCHEMA}.t MODIFY v DECIMAL(38,2)",
        f"INSERT INTO {SCHEMA}.t VALUES (2, '1.25', NOW(6))",
    )
    result = _silver(h)
    assert result.success
    warnings = [
        entry.user_message
        for entry in h.instance.all_logs(result.run_id)
        if entry.level == logging.WARNING
        and "DuckDB reads decimals of more than 38 digits" in entry.user_message
    ]
    assert warnings and "column 'v' is decimal256(40, 2)" in warnings[0]


def test_an_int_column_re_added_as_datetime_is_refused_naming_it_not_read_as_microseconds(
    h: BronzeHarness,
) -> None:
    _table(h, "v INT", "(1, 5, NOW(6))")
    _run_after(
        h,
        f"ALTER TABLE {SCHEMA}.t DROP COLUMN v, ADD COLUMN v DATETIME NULL",
        f"INSERT INTO {SCHEMA}.t VALUES (2, NOW(6), '2024-01-02 10:00:00')",
    )

    def named(message: str) -> bool:  # the files sort by run id: either may be named first
        return (
            "bronze/t: column 'v' is " in message
            and "a number in t/ingestion_date=" in message
            and "an instant or date in t/ingestion_date=" in message
        )

    # polars' relaxed concat made both Int64: the DATETIME read as 1704189600000000.
    with pytest.raises(ValueError) as refused:
        _polars_load(h)
    assert named(str(refused.value)) and "exclude_columns" in str(refused.value)
    # DuckDB failed with a cast error that advised the union_by_name it already had.
    message = _failure(_silver(h))
    assert named(message) and "mode: full_refresh" in message


def test_a_polars_load_of_a_decimal_beyond_38_digits_names_the_column_and_the_way_out(
    h: BronzeHarness,
) -> None:
    """polars' own error was ``precision must be between 1 and 38, got 65``: no asset, no column."""
    _table(h, "amount DECIMAL(65,30)", "(1, '1.5', NOW(6))")
    with pytest.raises(
        ValueError, match=r"bronze/t: column 'amount' is decimal256\(65, 30\) in t/ingestion_date="
    ) as e:
        _polars_load(h)
    assert "duckdb_path_input_manager" in str(e.value)


def test_a_renamed_key_column_is_refused_by_silver_until_bronze_is_read_again(h: BronzeHarness) -> None:
    """The old files have no ``t_id``: read by name, their rows shared one NULL key (4 rows for 3
    keys in silver, and the blocking key check failing on every run from then on)."""
    _table(h, "v VARCHAR(8)", "(1, 'a', NOW(6)), (2, 'b', NOW(6)), (3, 'c', NOW(6))")
    h.sql(f"ALTER TABLE {SCHEMA}.t RENAME COLUMN id TO t_id")
    h.tables[0]["primary_key"] = ["t_id"]
    assert h.run("t", config={"mode": "full_refresh"}) is not None
    message = _failure(_silver(h))
    assert "edge_test.t: 1 bronze file(s) have no column t_id of the primary key" in message
    assert "mode: full_refresh" in message
    # The way out the message gives: the old files moved away, every row read again.
    bronze = h.root / "lake" / "bronze" / "t"
    bronze.rename(h.root / "bronze_t_before_the_rename")
    assert h.run("t", config={"mode": "full_refresh"}) is not None
    silver = _silver_table(_silver(h))
    assert sorted(silver.column("t_id").to_pylist()) == [1, 2, 3]
