"""Delete reconciliation against a real MariaDB: keys deleted while the reconciling run reads.

A row of the run's own window — updated or inserted since the last run — can be deleted in the
source between the window's read and the key scan (an OLTP delete concurrent with the run). Its
tombstone must outrank the version the same run wrote, so silver drops the key at once.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import dagster as dg
import duckdb
import pytest

import datalake.deletes
from datalake.definitions import build_definitions
from datalake.extract import SPILL_PREFIX
from datalake_tests.bronze_harness import SCHEMA, BronzeHarness, meta

pytestmark = pytest.mark.mariadb

RECONCILE = {"reconcile_deletes": True}


@pytest.fixture
def harness(harness: BronzeHarness) -> BronzeHarness:
    """The shared harness (both readers) with table ``t``, its cursor set on every write."""
    harness.sql(
        f"""CREATE TABLE {SCHEMA}.t (id BIGINT PRIMARY KEY, v VARCHAR(10),
        updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6))"""
    )
    harness.register(table="t", primary_key=["id"], cursor={"column": "updated_at", "kind": "timestamp"})
    return harness


def _current_ids(h: BronzeHarness) -> list[int]:
    defs = build_definitions(h.settings())
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey(["silver", "t_current"])}
    )
    assert job.execute_in_process(instance=h.instance).success
    path = h.root / "lake" / "silver" / "t_current" / "t_current.parquet"
    relation = duckdb.sql(f"SELECT id FROM read_parquet('{path}') ORDER BY id")
    assert relation is not None
    return [int(row[0]) for row in relation.fetchall()]


def test_keys_of_the_runs_own_window_deleted_before_its_key_scan_are_dropped_at_once(
    harness: BronzeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    h.sql(f"INSERT INTO {SCHEMA}.t (id, v) VALUES (1, 'a'), (2, 'b')")
    time.sleep(0.05)
    h.run("t")
    # In the next window: key 1 updated, key 3 inserted. Both are deleted by the OLTP system after
    # the run has read its window, just before it scans the source's keys.
    h.sql(f"UPDATE {SCHEMA}.t SET v = 'a2' WHERE id = 1")
    h.sql(f"INSERT INTO {SCHEMA}.t (id, v) VALUES (3, 'c')")
    time.sleep(0.05)
    scan = datalake.deletes.source_keys

    def deleted_first(*args: Any, **kwargs: Any) -> Any:
        h.sql(f"DELETE FROM {SCHEMA}.t WHERE id IN (1, 3)")
        return scan(*args, **kwargs)

    monkeypatch.setattr(datalake.deletes, "source_keys", deleted_first)
    m = h.run("t", config=RECONCILE)
    assert meta(m, "dagster/row_count") == 4  # the window's 2 rows and 2 tombstones
    assert meta(m, "datalake/deletes_found") == 2
    written = h.read(m).to_pylist()
    for key in (1, 3):
        live, tombstone = (r for r in written if r["id"] == key)
        assert tombstone["_datalake_deleted"] and not live["_datalake_deleted"]
        assert tombstone["updated_at"] == live["updated_at"]  # the version this run read
    assert _current_ids(h) == [2]
    # The window's keys were kept in a spill directory of this process; it is gone.
    assert not [
        n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"{SPILL_PREFIX}{os.getpid()}-keys-")
    ]


def test_a_key_restored_after_its_delete_is_current_again_and_its_next_delete_is_found(
    harness: BronzeHarness,
) -> None:
    """A row deleted, then restored from a backup with its older ``updated_at``: the full refresh
    that reads it again brings it back, though its tombstone carries a later cursor."""
    h = harness
    h.sql(f"INSERT INTO {SCHEMA}.t VALUES (1, 'backup', '2024-05-01 09:00'), (2, 'b', '2024-05-01 09:00')")
    h.sql(f"UPDATE {SCHEMA}.t SET v = 'a2' WHERE id = 1")  # a newer version, then the delete
    h.run("t")
    h.sql(f"DELETE FROM {SCHEMA}.t WHERE id = 1")
    assert meta(h.run("t", config=RECONCILE), "datalake/deletes_found") == 1
    assert _current_ids(h) == [2]

    h.sql(f"INSERT INTO {SCHEMA}.t VALUES (1, 'restored', '2024-05-01 09:00')")  # from the backup
    full = h.run("t", config={"mode": "full_refresh"})
    assert meta(full, "dagster/row_count") == 2
    assert _current_ids(h) == [1, 2]
    # Nothing to reconcile while it is there; its next delete gets a tombstone of its own.
    assert meta(h.run("t", config=RECONCILE), "datalake/deletes_found") == 0
    h.sql(f"DELETE FROM {SCHEMA}.t WHERE id = 1")
    assert meta(h.run("t", config=RECONCILE), "datalake/deletes_found") == 1
    assert _current_ids(h) == [2]
