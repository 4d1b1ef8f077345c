"""The bronze check ``window_reconciles_with_source`` against a real MariaDB, through Dagster runs.

A "lost" row is one committed late with a cursor inside an already-extracted window: the thing
the check exists to catch. It must not be hidden by a reconciliation's delete tombstones (counted
in ``dagster/row_count``), nor by a later materialization of another partition.
"""

from __future__ import annotations

import datetime as dt
import time

import dagster as dg
import pytest

from datalake.definitions import build_definitions
from datalake_tests.bronze_harness import SCHEMA, BronzeHarness, meta
from datalake_tests.helpers import run_checks

pytestmark = pytest.mark.mariadb

CHECK = "window_reconciles_with_source"
KEY = dg.AssetKey(["bronze", "t"])


@pytest.fixture
def harness(harness: BronzeHarness) -> BronzeHarness:
    """The shared harness (both readers) with table ``t``."""
    h = harness
    h.sql(
        f"""CREATE TABLE {SCHEMA}.t (id BIGINT PRIMARY KEY, v VARCHAR(10),
            updated_at DATETIME(6) NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6))"""
    )
    h.register(table="t", primary_key=["id"], cursor={"column": "updated_at", "kind": "timestamp"})
    return h


def _insert(h: BronzeHarness, *ids: int) -> None:
    """New rows, their cursor strictly after the last window's end and before the next one's."""
    time.sleep(0.05)
    h.sql(f"INSERT INTO {SCHEMA}.t (id, v) VALUES " + ", ".join(f"({i}, 'v{i}')" for i in ids))
    time.sleep(0.05)


def _lose_row_in(h: BronzeHarness, materialization: dg.AssetMaterialization | None, row_id: int) -> None:
    """A row committed after the run, with a cursor in the middle of the run's window."""
    lo = dt.datetime.fromisoformat(meta(materialization, "datalake/window_lo"))
    hi = dt.datetime.fromisoformat(meta(materialization, "datalake/window_hi"))
    ts = (lo + (hi - lo) / 2).astimezone(dt.UTC).replace(tzinfo=None)
    h.sql(f"INSERT INTO {SCHEMA}.t (id, v, updated_at) VALUES (:i, 'late', :ts)", i=row_id, ts=ts)


def _check(h: BronzeHarness, partition: str | None = None) -> dg.AssetCheckEvaluation:
    return run_checks(
        build_definitions(h.settings()), {dg.AssetCheckKey(KEY, CHECK)}, h.instance, partition=partition
    )[("bronze/t", CHECK)]


def test_lost_row_fails_the_check_after_a_reconciliation_with_deletes(harness: BronzeHarness) -> None:
    h = harness
    _insert(h, 1, 2, 3)
    h.sql(f"INSERT INTO {SCHEMA}.t (id, v, updated_at) VALUES (9, 'nullcur', NULL)")  # re-read every run
    h.run("t")
    _insert(h, 4)
    h.sql(f"DELETE FROM {SCHEMA}.t WHERE id IN (1, 2)")
    m = h.run("t", config={"reconcile_deletes": True})
    # The file holds the window's row, the NULL-cursor row and two tombstones.
    assert meta(m, "datalake/deletes_found") == 2
    assert meta(m, "datalake/null_cursor_rows") == 1
    assert meta(m, "dagster/row_count") == 4
    assert meta(m, "datalake/window_rows") == 1
    assert _check(h).passed

    _lose_row_in(h, m, 40)
    evaluation = _check(h)
    assert not evaluation.passed
    assert evaluation.metadata["bronze_rows"].value == 1
    assert evaluation.metadata["source_rows_now"].value == 2


def test_check_of_a_partition_evaluates_its_window_after_another_day_is_backfilled(
    harness: BronzeHarness,
) -> None:
    h = harness
    today = dt.datetime.now(h.settings().tz).date()
    yesterday = today - dt.timedelta(days=1)
    _insert(h, 1, 2, 3)
    h.run("t", partition=today.isoformat())
    _insert(h, 4)
    m = h.run("t", partition=today.isoformat())
    _lose_row_in(h, m, 60)
    # A backfill of another day lands after today's run (its window holds none of these rows).
    backfill = h.run("t", partition=yesterday.isoformat())
    assert meta(backfill, "datalake/window_kind") == "backfill"

    evaluation = _check(h, partition=today.isoformat())
    assert not evaluation.passed
    assert evaluation.metadata["partition"].value == today.isoformat()
    window = f"[{meta(m, 'datalake/window_lo')}, {meta(m, 'datalake/window_hi')})"
    assert evaluation.metadata["window"].value == window
    assert evaluation.metadata["source_rows_now"].value == 2
    # The backfilled day is checked against its own window, which lost nothing.
    other = _check(h, partition=yesterday.isoformat())
    assert other.passed
    assert other.metadata["partition"].value == yesterday.isoformat()


def test_materialization_without_window_rows_discounts_tombstones(harness: BronzeHarness) -> None:
    """A materialization written before ``datalake/window_rows`` existed: row count less tombstones."""
    h = harness
    today = dt.datetime.now(h.settings().tz).date().isoformat()
    _insert(h, 1, 2, 3)
    h.run("t", partition=today)
    _insert(h, 4)
    h.sql(f"DELETE FROM {SCHEMA}.t WHERE id IN (1, 2)")
    m = h.run("t", partition=today, config={"reconcile_deletes": True})
    assert m is not None
    legacy = {k: v for k, v in m.metadata.items() if k != "datalake/window_rows"}
    h.instance.report_runless_asset_event(dg.AssetMaterialization(KEY, partition=today, metadata=legacy))
    assert _check(h, partition=today).passed

    _lose_row_in(h, m, 40)
    evaluation = _check(h, partition=today)
    assert not evaluation.passed
    assert evaluation.metadata["bronze_rows"].value == 1


def _check_of(h: BronzeHarness, table: str, partition: str) -> dg.AssetCheckEvaluation:
    key = dg.AssetCheckKey(dg.AssetKey(["bronze", table]), CHECK)
    return run_checks(build_definitions(h.settings()), {key}, h.instance, partition=partition)[
        (f"bronze/{table}", CHECK)
    ]


def test_backfill_over_the_date_column_counts_rows_whose_cursor_is_null(harness: BronzeHarness) -> None:
    """A day's backfill reads by ``date_column``: a row never updated (NULL cursor) is in that day."""
    h = harness
    h.sql(
        f"""CREATE TABLE {SCHEMA}.orders (id INT PRIMARY KEY, created_at DATETIME(6) NOT NULL,
            updated_at DATETIME(6) NULL)"""
    )
    h.sql(
        f"INSERT INTO {SCHEMA}.orders VALUES (1, '2024-05-02 10:00', NULL), "
        "(2, '2024-05-02 11:00', '2024-05-02 12:00'), (3, '2024-05-02 12:00', NULL), "
        "(4, '2024-05-03 12:00', NULL)"
    )
    h.register(table="orders", primary_key=["id"], cursor={"column": "updated_at"}, date_column="created_at")
    m = h.run("orders", partition="2024-05-02", tags={"dagster/backfill": "b1"})
    assert meta(m, "datalake/window_kind") == "backfill"
    assert meta(m, "datalake/null_cursor_rows") == 2
    assert meta(m, "datalake/window_rows") == 3
    assert _check_of(h, "orders", "2024-05-02").passed

    h.sql(f"INSERT INTO {SCHEMA}.orders VALUES (5, '2024-05-02 13:00', NULL)")  # landed after the backfill
    evaluation = _check_of(h, "orders", "2024-05-02")
    assert not evaluation.passed
    assert evaluation.metadata["bronze_rows"].value == 3
    assert evaluation.metadata["source_rows_now"].value == 4


def test_zero_date_cursors_lie_outside_a_first_runs_window(harness: BronzeHarness) -> None:
    """A first run's ``cursor < hi`` matches MySQL's zero date; bronze holds it as a NULL cursor."""
    h = harness
    h.sql(f"CREATE TABLE {SCHEMA}.legacy (id INT PRIMARY KEY, updated_at DATETIME NULL)")
    with h.admin.connect() as conn:
        conn.exec_driver_sql("SET SESSION sql_mode = ''")  # a legacy server that stores zero dates
        conn.exec_driver_sql(
            f"INSERT INTO {SCHEMA}.legacy VALUES (1, '2024-05-01 10:00'), (2, '0000-00-00 00:00:00'), (3, NULL)"
        )
        conn.commit()
    h.register(table="legacy", primary_key=["id"], cursor={"column": "updated_at"})
    today = dt.datetime.now(h.settings().tz).date().isoformat()
    m = h.run("legacy", partition=today)
    assert meta(m, "dagster/row_count") == 3
    assert meta(m, "datalake/zero_dates_nulled") == 1
    assert meta(m, "datalake/window_rows") == 1
    evaluation = _check_of(h, "legacy", today)
    assert evaluation.passed, evaluation.metadata
    assert evaluation.metadata["source_rows_now"].value == 1


@pytest.mark.parametrize("run", ["backfill of today", "window without an end"])
def test_a_stateless_window_into_the_present_stops_where_an_incremental_run_would(
    harness: BronzeHarness, run: str
) -> None:
    """A backfill of today, or an explicit window without an end, read up to the source's now: a
    row committed afterwards in the rest of the window was missing from it for good, and the
    reconciliation check failed although the next incremental run reads that row."""
    h = harness
    _insert(h, 1)
    today = dt.datetime.now(h.settings().tz).date().isoformat()
    if run == "backfill of today":
        m = h.run("t", partition=today, tags={"dagster/backfill": "b1"})
    else:
        m = h.run("t", config={"mode": "window", "window_start": "2024-05-01T00:00:00+00:00"})
    hi = meta(m, "datalake/window_hi")
    assert hi and dt.datetime.fromisoformat(hi) <= dt.datetime.now(dt.UTC)  # not tomorrow, not open
    assert h.read(m).column("id").to_pylist() == [1]
    _insert(h, 2)  # after the run: the next incremental run's
    assert _check(h, partition=today).passed
    assert sorted(h.read(h.run("t")).column("id").to_pylist()) == [1, 2]
