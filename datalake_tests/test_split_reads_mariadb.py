"""A large window read in parallel streams, cut on the primary key: every row once, and only
where the read is known to be large (MariaDB, the Arrow reader)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datalake_tests.bronze_harness import SCHEMA, BronzeHarness, meta
from datalake_tests.conftest import bronze_harness
from datalake_tests.services import MariaDBServer

pytestmark = pytest.mark.mariadb

# Four streams of at least 1 000 rows each: a window of 4 000 rows or more is split.
STREAMS = {"DATALAKE_EXTRACT_STREAMS": "4", "DATALAKE_EXTRACT_STREAM_MIN_ROWS": "1000"}


@pytest.fixture
def h(
    mariadb_server: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[BronzeHarness]:
    yield from bronze_harness(mariadb_server, tmp_path, monkeypatch, "auto", STREAMS)


def _ids(h: BronzeHarness, table: str) -> list[int]:
    return sorted(h.bronze(table).column("id").to_pylist())


def test_a_full_read_is_split_and_an_incremental_time_window_is_not(h: BronzeHarness) -> None:
    # Sparse, uneven ids (gaps, a dense run at the top): the cuts are only a partition of the keys.
    h.sql(
        f"CREATE TABLE {SCHEMA}.events (id BIGINT UNSIGNED PRIMARY KEY, v INT NOT NULL, "
        "updated_at DATETIME(6) NOT NULL) ENGINE=InnoDB"
    )
    h.sql(
        f"INSERT INTO {SCHEMA}.events SELECT seq * 7, seq, '2024-05-01' FROM {SCHEMA}.seq_1_to_8000 "
        f"UNION ALL SELECT 18446744073709551000 + seq, seq, '2024-05-01' FROM {SCHEMA}.seq_1_to_500"
    )
    h.sql(f"ANALYZE TABLE {SCHEMA}.events")  # the row estimate a read without lower bound goes by
    h.register(table="events", primary_key=["id"], cursor={"column": "updated_at"})
    source = sorted(r[0] for r in h.sql(f"SELECT id FROM {SCHEMA}.events"))

    first = h.run("events")
    assert meta(first, "datalake/streams") == 4
    assert meta(first, "dagster/row_count") == 8500
    assert _ids(h, "events") == source  # each row once

    # An incremental window over the time cursor: its rows are not known to be many.
    h.sql(f"UPDATE {SCHEMA}.events SET v = v + 1, updated_at = NOW(6) WHERE id % 2 = 0")
    time.sleep(0.05)  # the harness's lag is 0
    second = h.run("events")
    assert meta(second, "datalake/streams") == 1
    assert meta(second, "dagster/row_count") == 4000 + 250  # the even ids

    refreshed = h.run("events", config={"mode": "full_refresh"})
    assert meta(refreshed, "datalake/streams") == 4
    assert meta(refreshed, "dagster/row_count") == 8500
    assert sorted(h.read(refreshed).column("id").to_pylist()) == source


def test_an_id_cursor_that_is_the_key_is_split_by_the_ids_in_its_window(h: BronzeHarness) -> None:
    h.sql(
        f"CREATE TABLE {SCHEMA}.cdr (id INT PRIMARY KEY, v INT NOT NULL, "
        "created_at DATETIME(6) NOT NULL) ENGINE=InnoDB"
    )
    h.sql(f"INSERT INTO {SCHEMA}.cdr SELECT seq, seq, '2024-05-01' FROM {SCHEMA}.seq_1_to_6000")
    h.register(
        table="cdr", primary_key=["id"], cursor={"column": "id", "kind": "integer"}, date_column="created_at"
    )
    first = h.run("cdr")
    assert meta(first, "datalake/streams") == 4  # 6 000 ids: no estimate needed
    # 3 000 new ids: under four streams' 1 000 each, read in one.
    h.sql(f"INSERT INTO {SCHEMA}.cdr SELECT 6000 + seq, seq, '2024-05-02' FROM {SCHEMA}.seq_1_to_3000")
    second = h.run("cdr")
    assert (meta(second, "datalake/streams"), meta(second, "dagster/row_count")) == (1, 3000)
    h.sql(f"INSERT INTO {SCHEMA}.cdr SELECT 9000 + seq, seq, '2024-05-03' FROM {SCHEMA}.seq_1_to_5000")
    third = h.run("cdr")
    assert (meta(third, "datalake/streams"), meta(third, "dagster/row_count")) == (4, 5000)
    assert _ids(h, "cdr") == list(range(1, 14001))


def test_reads_that_cannot_be_cut_on_one_integer_key_are_read_in_one_stream(h: BronzeHarness) -> None:
    h.sql(
        f"CREATE TABLE {SCHEMA}.pairs (a INT, b INT, updated_at DATETIME(6) NOT NULL, PRIMARY KEY (a, b)) "
        "ENGINE=InnoDB"
    )
    h.sql(f"INSERT INTO {SCHEMA}.pairs SELECT seq % 100, seq, '2024-05-01' FROM {SCHEMA}.seq_1_to_6000")
    h.sql(f"CREATE TABLE {SCHEMA}.codes (code VARCHAR(8) PRIMARY KEY, updated_at DATETIME(6) NOT NULL)")
    h.sql(f"INSERT INTO {SCHEMA}.codes SELECT CONCAT('c', seq), '2024-05-01' FROM {SCHEMA}.seq_1_to_6000")
    h.sql(f"CREATE TABLE {SCHEMA}.ids (id INT PRIMARY KEY, updated_at DATETIME(6) NOT NULL)")
    h.sql(f"INSERT INTO {SCHEMA}.ids SELECT seq, '2024-05-01' FROM {SCHEMA}.seq_1_to_6000")
    h.sql(f"CREATE VIEW {SCHEMA}.ids_view AS SELECT id, updated_at FROM {SCHEMA}.ids")
    h.sql(f"ANALYZE TABLE {SCHEMA}.pairs, {SCHEMA}.codes, {SCHEMA}.ids")
    h.register(table="pairs", primary_key=["a", "b"], cursor={"column": "updated_at"})
    h.register(table="codes", primary_key=["code"], cursor={"column": "updated_at"})
    h.register(table="ids_view", primary_key=["id"], cursor={"column": "updated_at"})
    # A table's own setting wins over DATALAKE_EXTRACT_STREAMS.
    h.register(table="ids", primary_key=["id"], cursor={"column": "updated_at"}, streams=1)
    for table in ("pairs", "codes", "ids_view", "ids"):
        materialization = h.run(table)
        assert (meta(materialization, "datalake/streams"), meta(materialization, "dagster/row_count")) == (
            1,
            6000,
        ), table
