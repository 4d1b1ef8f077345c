"""Bronze extraction semantics and type fidelity against a real MariaDB, for both readers.

`arrow` is the Arrow-native reader (connectorx + server-side casts), `rows` the
SQLAlchemy/PyMySQL fallback; every test runs through Dagster as a user's run does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from datalake.definitions import build_definitions
from datalake.watermark import COMPLETE_UNTIL_KEY, WATERMARK_KEY
from datalake_tests.bronze_harness import SCHEMA, BronzeHarness, meta
from datalake_tests.helpers import REPO
from datalake_tests.services import MariaDBServer

pytestmark = pytest.mark.mariadb
UTC = dt.UTC
EPOCH = dt.date(1970, 1, 1)


def _events(h: BronzeHarness, extra: str = "") -> None:
    h.sql(
        f"""CREATE TABLE {SCHEMA}.events (
            id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
            payload VARCHAR(64) NOT NULL,
            updated_at DATETIME(6) NULL, {extra}
            INDEX (updated_at)) ENGINE=InnoDB"""
    )
    h.register(table="events", primary_key=["id"], cursor={"column": "updated_at"})


# --- types ---------------------------------------------------------------------------

EDGE_DDL = f"""CREATE TABLE {SCHEMA}.edge (
  id BIGINT UNSIGNED PRIMARY KEY,
  d65 DECIMAL(65,30), d20 DECIMAL(20,12), dneg DECIMAL(10,2),
  u64 BIGINT UNSIGNED, i64 BIGINT, u32 INT UNSIGNED, i8 TINYINT, u8 TINYINT UNSIGNED, m24 MEDIUMINT,
  b TINYINT(1), bits BIT(12), y YEAR, e ENUM('a','b','ü','😀'), s SET('x','y','z'), j JSON,
  tm TIME(6), d DATE, dtt DATETIME(6), dt0 DATETIME, ts TIMESTAMP(6) NULL DEFAULT NULL,
  c CHAR(4), txt TEXT, blb BLOB, vb VARBINARY(16), f FLOAT, dbl DOUBLE,
  all_null DECIMAL(9,3) NULL, d28 DECIMAL(28,10), d20i DECIMAL(20,0), d19 DECIMAL(19,1),
  e2 ENUM('it''s', 'ü x', 'a,b'), e3 ENUM('a\\\\b', 'c'), updated_at DATETIME(6) NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"""

EDGE_ROW_MAX = (
    "1, '99999999999999999999999999999999999.999999999999999999999999999999', '12345678.123456789012', "
    "'-99999999.99', 18446744073709551615, -9223372036854775808, 4294967295, -128, 255, -8388608, "
    "1, b'111111111111', 2155, 'ü', 'x,z', '{\"a\": [1, 2.5, \"😀\"]}', '-838:59:59.000000', '9999-12-31', "
    "'9999-12-31 23:59:59.999999', '1000-01-01 00:00:00', '2038-01-19 03:14:07.999999', "
    "'ab  ', 'emoji 😀 ünïcödé', x'00ff10', x'deadbeef', 1.5, -2.25, NULL, '-999999999999999999.9999999999', "
    "'99999999999999999999', '-999999999999999999.9', 'it''s', 'a\\\\b', '2024-01-01 00:00:00'"
)
EDGE_ROW_MIN = (
    "2, '-0.000000000000000000000000000001', '0.000000000001', '0.00', 0, 9223372036854775807, 0, 127, 0, "
    "8388607, 0, b'000000000001', 1901, '😀', '', '[]', '838:59:59.999999', '1000-01-01', "
    "'1000-01-01 00:00:00.000001', '2024-02-29 12:00:00', '1970-01-01 00:00:01.000000', "
    "'', '', x'', x'', -1.5, 1e308, NULL, '0.0000000001', '-1', '0.1', 'not a label', 'c', "
    "'2024-01-01 00:00:00'"
)
EDGE_ROW_NULLS = (
    "3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
    "'-00:00:00.500000', '0000-00-00', '0000-00-00 00:00:00', '2024-00-00 00:00:00', NULL, "
    "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '2024-01-01 00:00:00'"
)


def test_type_edges_round_trip_exactly(harness: BronzeHarness) -> None:
    h = harness
    h.sql(EDGE_DDL)
    h.sql("SET SESSION sql_mode = ''")  # allows zero dates, as legacy V3 rows have them
    with h.admin.connect() as conn:
        conn.exec_driver_sql("SET SESSION sql_mode = ''")
        conn.exec_driver_sql(
            f"INSERT INTO {SCHEMA}.edge VALUES ({EDGE_ROW_MAX}), ({EDGE_ROW_MIN}), ({EDGE_ROW_NULLS})"
        )
    h.register(table="edge", primary_key=["id"], cursor={"column": "updated_at"})
    materialization = h.run("edge")
    table = h.read(materialization)
    schema = table.schema
    expected_types = {
        "id": pa.uint64(),
        "d65": pa.decimal256(65, 30),
        "d20": pa.decimal128(20, 12),
        "dneg": pa.decimal128(10, 2),
        "u64": pa.uint64(),
        "i64": pa.int64(),
        "u32": pa.uint32(),
        "i8": pa.int8(),
        "u8": pa.uint8(),
        "m24": pa.int32(),
        "b": pa.bool_(),
        "bits": pa.uint64(),
        "y": pa.int16(),
        "e": pa.string(),
        "s": pa.string(),
        "j": pa.string(),
        "tm": pa.duration("us"),
        "d": pa.date32(),
        "dtt": pa.timestamp("us", tz="UTC"),
        "dt0": pa.timestamp("us", tz="UTC"),
        "ts": pa.timestamp("us", tz="UTC"),
        "c": pa.string(),
        "txt": pa.string(),
        "blb": pa.binary(),
        "vb": pa.binary(),
        "f": pa.float32(),
        "dbl": pa.float64(),
        "all_null": pa.decimal128(9, 3),
        "d28": pa.decimal128(28, 10),
        "d20i": pa.decimal128(20, 0),
        "d19": pa.decimal128(19, 1),
        "e2": pa.string(),
        "e3": pa.string(),
    }
    for name, arrow in expected_types.items():
        assert schema.field(name).type == arrow, name

    rows = {r["id"]: r for r in table.to_pylist()}
    top, low, nulls = rows[1], rows[2], rows[3]
    assert top["d65"] == Decimal("99999999999999999999999999999999999.999999999999999999999999999999")
    assert low["d65"] == Decimal("-0.000000000000000000000000000001")
    assert top["d20"] == Decimal("12345678.123456789012")
    assert top["dneg"] == Decimal("-99999999.99")
    # the widest DECIMAL connectorx carries natively (no text cast), at both ends
    assert top["d28"] == Decimal("-999999999999999999.9999999999")
    assert low["d28"] == Decimal("0.0000000001") and nulls["d28"] is None
    # more than 18 integer digits do not fit connectorx's 28 digits at scale 10 (read as text)
    assert top["d20i"] == Decimal("99999999999999999999") and low["d20i"] == Decimal("-1")
    assert top["d19"] == Decimal("-999999999999999999.9") and low["d19"] == Decimal("0.1")
    assert top["u64"] == 2**64 - 1
    assert top["i64"] == -(2**63) and low["i64"] == 2**63 - 1
    assert top["u32"] == 2**32 - 1 and top["i8"] == -128 and top["u8"] == 255 and top["m24"] == -8388608
    assert top["b"] is True and low["b"] is False and nulls["b"] is None
    assert top["bits"] == 0b111111111111 and low["bits"] == 1
    assert top["y"] == 2155 and low["y"] == 1901
    # a 4-byte label: MariaDB's SHOW CREATE TABLE (what SQLAlchemy reflects) shows it as '?'
    assert top["e"] == "ü" and low["e"] == "😀" and top["s"] == "x,z" and low["s"] == ""
    # labels reflection gives exactly (the arrow reader reads their index); an invalid value
    # stored under sql_mode '' is index 0, the empty string; a backslash in a label
    assert top["e2"] == "it's" and low["e2"] == "" and nulls["e2"] is None
    assert top["e3"] == "a\\b" and low["e3"] == "c" and nulls["e3"] is None
    assert top["j"].replace(" ", "") == '{"a":[1,2.5,"😀"]}'
    assert top["tm"] == -dt.timedelta(hours=838, minutes=59, seconds=59)
    assert low["tm"] == dt.timedelta(hours=838, minutes=59, seconds=59, microseconds=999999)
    assert nulls["tm"] == -dt.timedelta(microseconds=500000)
    assert top["d"] == dt.date(9999, 12, 31) and low["d"] == dt.date(1000, 1, 1)
    assert top["dtt"] == dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert low["dtt"] == dt.datetime(1000, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    assert top["ts"] == dt.datetime(2038, 1, 19, 3, 14, 7, 999999, tzinfo=UTC)
    assert low["ts"] == dt.datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert top["c"] == "ab" and top["txt"] == "emoji 😀 ünïcödé"
    assert top["blb"] == b"\x00\xff\x10" and top["vb"] == b"\xde\xad\xbe\xef" and low["vb"] == b""
    assert top["f"] == 1.5 and low["dbl"] == 1e308
    assert all(r["all_null"] is None for r in rows.values())
    # zero dates: DATE, DATETIME and a partial zero date -> NULL, and counted
    assert nulls["d"] is None and nulls["dtt"] is None and nulls["dt0"] is None
    assert meta(materialization, "datalake/zero_dates_nulled") == 3
    if h.reader == "auto":
        from datalake.arrow_reader import enum_labels

        # e2 was read as its index; e (an emoji label shows as '?') and e3 (a backslash) as labels
        edge = sa.Table("edge", sa.MetaData(), schema=SCHEMA, autoload_with=h.admin)
        assert enum_labels(edge.c.e2) == ["", "it's", "ü x", "a,b"]
        assert enum_labels(edge.c.e) is None and enum_labels(edge.c.e3) is None
        # native dates panic in connectorx: the window is read again, guarded
        assert meta(materialization, "datalake/date_guards") is True
        assert meta(materialization, "datalake/passes") == 2
        assert table.num_rows == 3 and len(set(table.column("id").to_pylist())) == 3


def test_a_tinyint1_holding_other_numbers_fails_naming_it_and_reads_exactly_once_listed(
    harness: BronzeHarness,
) -> None:
    h = harness
    h.sql(
        f"""CREATE TABLE {SCHEMA}.flags (id INT PRIMARY KEY, active TINYINT(1), level TINYINT(1),
            level_u TINYINT(1) UNSIGNED, updated_at DATETIME(6) NOT NULL)"""
    )
    h.sql(f"INSERT INTO {SCHEMA}.flags VALUES (1, 1, 0, 0, '2024-01-01'), (4, 1, NULL, 1, '2024-01-01')")
    h.register(table="flags", primary_key=["id"], cursor={"column": "updated_at"})
    first = h.read(h.run("flags"))  # 0 and 1 only: booleans
    assert first.schema.field("level").type == pa.bool_()

    h.sql(
        f"""INSERT INTO {SCHEMA}.flags VALUES (2, 0, 2, 255, NOW(6)), (3, NULL, -128, NULL, NOW(6)),
            (5, 0, 2, 7, NOW(6))"""
    )
    h.sql(f"UPDATE {SCHEMA}.flags SET level = 3, updated_at = NOW(6) WHERE id = 4")
    time.sleep(0.05)
    key = dg.AssetKey(["bronze", "flags"])
    committed = h.instance.get_latest_materialization_event(key)

    def refused(match: str) -> None:
        with pytest.raises(Exception, match=match):
            h.run("flags")
        assert h.instance.get_latest_materialization_event(key) == committed  # watermark unmoved
        assert len(list((h.root / "lake" / "bronze" / "flags").rglob("*.parquet"))) == 1  # no new file

    # Read as booleans, -128, 2 and 3 would all be true: the read fails, naming the column and
    # the key (read in streams, the first batch to fail may hold only some of the values).
    holds = r"TINYINT\(1\), read as a boolean, holds (-?\d+, )*-?\d+, which true would lose"
    refused(rf"edge_test\.flags\.level: {holds}; add 'level' to tinyint1_as_integer")
    h.tables[-1]["tinyint1_as_integer"] = ["level"]
    refused(rf"edge_test\.flags\.level_u: {holds}; add 'level_u'")
    h.tables[-1]["tinyint1_as_integer"] = ["id"]
    refused(r"tinyint1_as_integer column 'id' is INTEGER, not TINYINT\(1\)")
    h.tables[-1]["tinyint1_as_integer"] = ["levels"]
    refused(r"tinyint1_as_integer column\(s\) \['levels'\] not in the source table")

    h.tables[-1]["tinyint1_as_integer"] = ["level", "level_u"]
    table = h.read(h.run("flags"))
    assert table.schema.field("active").type == pa.bool_()  # 0/1 only: still a boolean
    assert table.schema.field("level").type == pa.int8()
    assert table.schema.field("level_u").type == pa.uint8()
    # Silver reads the boolean file and the numbers' together by name: the current rows, exact.
    silver_key = dg.AssetKey(["silver", "flags_current"])
    job = build_definitions(h.settings()).resolve_implicit_global_asset_job_def()
    result = job.get_subset(asset_selection={silver_key}).execute_in_process(instance=h.instance)
    current = pq.read_table(
        str(result.get_asset_materialization_events()[0].materialization.metadata["dagster/uri"].value)
    )
    rows = sorted(current.select(["id", "active", "level", "level_u"]).to_pylist(), key=lambda r: r["id"])
    assert [(r["id"], r["active"], r["level"], r["level_u"]) for r in rows] == [
        (1, True, 0, 0),  # from the boolean file: false and true read as 0 and 1
        (2, False, 2, 255),
        (3, None, -128, None),
        (4, True, 3, 1),
        (5, False, 2, 7),
    ]


def test_dates_of_year_zero_are_dates_not_zero_dates(harness: BronzeHarness) -> None:
    """MariaDB takes '0000-01-01' as a DATE (month and day set): the driver hands the row reader a
    string for it, as for a zero date, but only a month or day of 0 is a zero date."""
    h = harness
    h.sql(
        f"CREATE TABLE {SCHEMA}.old (id INT PRIMARY KEY, d DATE, dtt DATETIME(6), updated_at DATETIME(6) NOT NULL)"
    )
    h.sql(
        f"INSERT INTO {SCHEMA}.old VALUES (1, '0000-01-01', '0000-03-01 12:00:00.5', '2024-01-01'), "
        "(2, '2024-05-01', '2024-05-01 10:00:00', '2024-01-01'), (3, NULL, NULL, '2024-01-01')"
    )
    h.register(table="old", primary_key=["id"], cursor={"column": "updated_at"})
    m = h.run("old")
    table = h.read(m).sort_by("id")
    assert meta(m, "datalake/zero_dates_nulled") == 0
    day_zero = -719528  # 0000-01-01, proleptic Gregorian
    assert table.column("d").cast(pa.int32()).to_pylist() == [
        day_zero,
        (dt.date(2024, 5, 1) - EPOCH).days,
        None,
    ]
    march_1 = day_zero + 31 + 29  # year 0 is a leap year
    assert table.column("dtt").cast(pa.int64()).to_pylist() == [
        march_1 * 86_400_000_000 + 12 * 3_600_000_000 + 500_000,
        int(dt.datetime(2024, 5, 1, 10, tzinfo=UTC).timestamp()) * 1_000_000,
        None,
    ]


def test_zero_dates_appearing_later_switch_the_table_to_guarded_reads(harness: BronzeHarness) -> None:
    """Native date reads until a zero date shows up; then one re-read, and guarded from then on."""
    h = harness
    h.sql(
        f"""CREATE TABLE {SCHEMA}.legacy (id INT PRIMARY KEY, born DATE NULL, seen DATETIME(3) NULL,
            updated_at DATETIME(6) NOT NULL) ENGINE=InnoDB"""
    )
    h.register(table="legacy", primary_key=["id"], cursor={"column": "updated_at"})
    h.sql(
        f"INSERT INTO {SCHEMA}.legacy VALUES (1, '2000-02-29', '2024-03-31 02:30:00.125', NOW(6) - INTERVAL 1 HOUR)"
    )
    clean = h.run("legacy")
    assert meta(clean, "dagster/row_count") == 1 and meta(clean, "datalake/zero_dates_nulled") == 0
    assert meta(clean, "datalake/date_guards") is False and meta(clean, "datalake/passes") == 1
    row = h.read(clean).to_pylist()[0]
    assert row["born"] == dt.date(2000, 2, 29) and row["seen"] == dt.datetime(
        2024, 3, 31, 2, 30, 0, 125000, tzinfo=UTC
    )

    with h.admin.connect() as conn:
        conn.exec_driver_sql("SET SESSION sql_mode = ''")
        conn.exec_driver_sql(
            f"INSERT INTO {SCHEMA}.legacy VALUES (2, '0000-00-00', '2024-00-10 00:00:00', NOW(6)), "
            f"(3, '1999-12-31', NULL, NOW(6))"
        )
        conn.commit()
    dirty = h.run("legacy")
    rows = {r["id"]: r for r in h.read(dirty).to_pylist()}
    assert sorted(rows) == [2, 3] and meta(dirty, "dagster/row_count") == 2
    assert rows[2]["born"] is None and rows[2]["seen"] is None and rows[3]["born"] == dt.date(1999, 12, 31)
    assert meta(dirty, "datalake/zero_dates_nulled") == 2
    guarded = h.reader == "auto"
    assert meta(dirty, "datalake/date_guards") is guarded
    assert meta(dirty, "datalake/passes") == (2 if guarded else 1)

    time.sleep(0.01)
    h.sql(f"UPDATE {SCHEMA}.legacy SET updated_at = NOW(6) WHERE id = 3")
    time.sleep(0.01)
    after = h.run("legacy")
    assert [r["id"] for r in h.read(after).to_pylist()] == [3]
    # remembered from the last materialization: guarded from the start, one pass
    assert meta(after, "datalake/date_guards") is guarded and meta(after, "datalake/passes") == 1
    ids = h.bronze("legacy").column("id").to_pylist()
    assert sorted(ids) == [1, 2, 3, 3]


def test_row_groups_follow_batch_size_dictionaries_where_values_repeat_and_delta_for_unique_integers(
    harness: BronzeHarness,
) -> None:
    h = harness
    h.sql(
        f"""CREATE TABLE {SCHEMA}.calls (id INT PRIMARY KEY, kind VARCHAR(8) NOT NULL, partner INT NOT NULL,
            reference VARCHAR(16) NOT NULL, amount DECIMAL(12,4) NOT NULL, updated_at DATETIME(6) NOT NULL,
            cell INT NOT NULL, cell_name VARCHAR(16) NOT NULL) ENGINE=InnoDB"""
    )
    # reference, amount: unique per row but not keys by the spec; partner: 7 values; kind: 3;
    # cell and cell_name: 2000 values, i.e. each repeats ~8 times in the counted rows
    h.sql(
        f"INSERT INTO {SCHEMA}.calls SELECT seq, ELT(1 + seq % 3, 'voice', 'sms', 'data'), seq % 7, "
        f"CONCAT('ref-', seq), seq / 10000, '2024-05-01' + INTERVAL seq SECOND, seq % 2000, "
        f"CONCAT('cell-', seq % 2000) FROM {SCHEMA}.seq_1_to_50000"
    )
    h.register(table="calls", primary_key=["id"], cursor={"column": "updated_at"}, batch_size=20000)
    materialization = h.run("calls")
    footer = pq.ParquetFile(str(materialization.metadata["dagster/uri"].value)).metadata  # type: ignore[union-attr]
    assert [footer.row_group(i).num_rows for i in range(footer.num_row_groups)] == [20000, 20000, 10000]
    columns = {footer.schema.column(i).name: i for i in range(footer.num_columns)}

    def encodings(name: str) -> set[str]:
        return set(footer.row_group(0).column(columns[name]).encodings)

    def dictionary(name: str) -> bool:
        return any("DICTIONARY" in e for e in encodings(name))

    assert dictionary("kind") and dictionary("partner") and dictionary("_datalake_run_id")
    assert not dictionary("id") and not dictionary("updated_at") and not dictionary("_datalake_row_seq")
    assert not dictionary("reference")  # decided on the data: its values do not repeat
    # A string repeating ~8 times gets a dictionary; an integer must repeat far more than that,
    # as delta encoding is the cheaper alternative for it.
    assert dictionary("cell_name") and not dictionary("cell")
    # Integer-like columns without a dictionary are delta-encoded (DECIMAL(12,4) stored as INT64);
    # strings stay plain.
    for name in ("id", "amount", "updated_at", "_datalake_row_seq", "cell"):
        assert "DELTA_BINARY_PACKED" in encodings(name) and "PLAIN" not in encodings(name), name
    assert "PLAIN" in encodings("reference")
    assert footer.schema.column(columns["amount"]).physical_type == "INT64"
    lake = h.bronze("calls").sort_by("id")
    assert lake.column("id").to_pylist() == list(range(1, 50001))
    assert lake.schema.field("amount").type == pa.decimal128(12, 4)
    assert lake.column("amount").to_pylist()[-1] == Decimal("5.0000")
    assert sorted(lake.column("_datalake_row_seq").to_pylist()) == list(range(50000))
    # Narrow rows: the byte bound changes nothing, fetches are full size.
    assert meta(materialization, "datalake/fetch_rows") == (16384 if h.reader == "auto" else 20000)
    # A first run has no lower bound: split where reads are (the row reader never splits).
    assert meta(materialization, "datalake/streams") == (3 if h.split else 1)


def test_wide_rows_are_read_and_written_in_bounded_bytes(harness: BronzeHarness) -> None:
    """Documents of 128 KB: fetches and row groups are sized by bytes, not rows; nothing is lost."""
    h = harness
    h.sql(
        f"""CREATE TABLE {SCHEMA}.docs (id INT PRIMARY KEY, kind VARCHAR(8) NOT NULL, body LONGTEXT NOT NULL,
            tpl TEXT NOT NULL, raw LONGBLOB NULL, j JSON NULL, updated_at DATETIME(6) NOT NULL) ENGINE=InnoDB"""
    )
    h.sql(
        f"INSERT INTO {SCHEMA}.docs SELECT seq, 'doc', REPEAT(MD5(seq), 4096), REPEAT('t', 4000), UNHEX(REPEAT(MD5(seq), 64)), "
        f"JSON_OBJECT('n', seq), '2024-05-01' + INTERVAL seq SECOND FROM {SCHEMA}.seq_1_to_120"
    )
    h.sql(f"ANALYZE TABLE {SCHEMA}.docs")  # the source's average row length sizes the fetches
    cap = 2 * 2**20
    h.register(table="docs", primary_key=["id"], cursor={"column": "updated_at"}, batch_bytes=cap)
    materialization = h.run("docs")
    assert meta(materialization, "dagster/row_count") == 120
    fetch = meta(materialization, "datalake/fetch_rows")
    # 256 KiB per fetch (an eighth of the bound) at ~130 KB a row; the row reader then adapts
    assert 1 <= fetch <= 4, fetch
    assert meta(materialization, "datalake/batches") >= 120 // 4
    footer = pq.ParquetFile(str(materialization.metadata["dagster/uri"].value)).metadata  # type: ignore[union-attr]
    sizes = [footer.row_group(i).total_byte_size for i in range(footer.num_row_groups)]
    assert footer.num_row_groups >= 7, sizes  # ~15.7 MB in row groups of ~2 MiB, not one
    assert max(sizes) <= cap + 4 * 140_000, sizes  # the bound, overshot by at most one fetch
    columns = {footer.row_group(0).column(i).path_in_schema: i for i in range(footer.num_columns)}
    # Wide values are not counted for a dictionary (that copied the sample), even where they
    # repeat (tpl: one 4 KB text); short columns still are.
    for name in ("body", "tpl"):
        assert not any("DICTIONARY" in e for e in footer.row_group(0).column(columns[name]).encodings), name
    assert any("DICTIONARY" in e for e in footer.row_group(0).column(columns["kind"]).encodings)
    lake = h.bronze("docs").sort_by("id")
    expected = h.sql(f"SELECT id, MD5(body), HEX(raw), j FROM {SCHEMA}.docs ORDER BY id")
    assert lake.column("id").to_pylist() == [r[0] for r in expected]
    assert [hashlib.md5(b.encode()).hexdigest() for b in lake.column("body").to_pylist()] == [
        r[1] for r in expected
    ]
    assert [b.hex().upper() for b in lake.column("raw").to_pylist()] == [r[2] for r in expected]
    assert lake.column("j").to_pylist()[0] == expected[0][3]

    # The same table with its wide columns excluded reads in full-size fetches: the source's
    # average row length counts them, the declared sizes of what is read bound it.
    h.sql(f"CREATE TABLE {SCHEMA}.docs_meta LIKE {SCHEMA}.docs")
    h.sql(f"INSERT INTO {SCHEMA}.docs_meta SELECT * FROM {SCHEMA}.docs")
    h.sql(f"ANALYZE TABLE {SCHEMA}.docs_meta")
    h.register(
        table="docs_meta",
        primary_key=["id"],
        cursor={"column": "updated_at"},
        exclude_columns=["body", "tpl", "raw", "j"],
    )
    narrow = h.run("docs_meta")
    assert meta(narrow, "dagster/row_count") == 120
    assert meta(narrow, "datalake/fetch_rows") >= 16384


# --- windows and watermarks -------------------------------------------------------------


def test_ties_at_the_boundary_are_neither_lost_nor_repeated(harness: BronzeHarness) -> None:
    h = harness
    _events(h)
    h.sql(
        f"INSERT INTO {SCHEMA}.events (payload, updated_at) "
        f"SELECT CONCAT('first-', seq), '2024-05-01 10:00:00.000000' FROM {SCHEMA}.seq_1_to_3000"
    )
    first = h.run("events")
    assert meta(first, "dagster/row_count") == 3000
    watermark = meta(first, WATERMARK_KEY)
    # 2000 more rows carry exactly the committed watermark: [lo, hi) must read them next time
    # (a `>` comparison on the last value seen would lose them).
    h.sql(
        f"INSERT INTO {SCHEMA}.events (payload, updated_at) "
        f"SELECT CONCAT('tie-', seq), :wm FROM {SCHEMA}.seq_1_to_2000",
        wm=dt.datetime.fromisoformat(watermark).replace(tzinfo=None),
    )
    second = h.run("events")
    assert meta(second, "dagster/row_count") == 2000
    assert meta(second, "datalake/window_lo") == watermark
    third = h.run("events")
    assert meta(third, "dagster/row_count") == 0
    ids = h.bronze("events").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 5000


def test_second_update_within_a_second_across_runs_keeps_both_versions(harness: BronzeHarness) -> None:
    h = harness
    _events(h)
    h.sql(f"INSERT INTO {SCHEMA}.events (id, payload, updated_at) VALUES (1, 'v1', NOW(6))")
    time.sleep(0.05)
    h.run("events")
    h.sql(f"UPDATE {SCHEMA}.events SET payload = 'v2', updated_at = NOW(6) WHERE id = 1")
    time.sleep(0.05)
    h.run("events")
    versions = h.bronze("events").sort_by("updated_at").to_pylist()
    assert [v["payload"] for v in versions] == ["v1", "v2"]
    assert versions[1]["updated_at"] - versions[0]["updated_at"] < dt.timedelta(seconds=1)


def test_an_update_stamped_by_now_in_the_second_of_hi_is_read_with_a_lag_of_one_second(
    harness: BronzeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``NOW()`` stamps whole seconds, also into a DATETIME(6): an update committed just after
    ``hi``, in its second, is stamped below it. With a lag under 1 s (a review used 0.1 s) the next
    window, starting at ``hi``, never read it; with the 1 s the README asks for, it does."""
    import datalake.extract

    h = harness
    h.extra_env["DATALAKE_EXTRACT_LAG_SECONDS"] = "1"
    h.sql(f"CREATE TABLE {SCHEMA}.t (id INT PRIMARY KEY, v VARCHAR(8), updated_at DATETIME(6) NOT NULL)")
    h.register(table="t", primary_key=["id"], cursor={"column": "updated_at"})
    h.sql(f"INSERT INTO {SCHEMA}.t VALUES (1, 'v1', NOW(6) - INTERVAL 1 MINUTE)")
    h.run("t")
    original = datalake.extract.resolve_bounds

    def resolve(*args: Any, **kwargs: Any) -> Any:
        # hi taken in the middle of a second; the update commits 0.2 s later, in the same second.
        while not 0.4 <= float(h.sql("SELECT MICROSECOND(NOW(6)) / 1e6")[0][0]) < 0.6:
            time.sleep(0.01)
        bounds = original(*args, **kwargs)
        update = f"UPDATE {SCHEMA}.t SET v = 'v2', updated_at = NOW() WHERE id = 1"
        threading.Timer(0.2, lambda: h.sql(update)).start()
        return bounds

    monkeypatch.setattr(datalake.extract, "resolve_bounds", resolve)
    first = h.run("t")
    monkeypatch.setattr(datalake.extract, "resolve_bounds", original)
    time.sleep(2.3)  # the update, then the lag
    second = h.run("t")
    stamped = h.sql(f"SELECT updated_at FROM {SCHEMA}.t")[0][0]
    assert stamped.microsecond == 0  # NOW(): whole seconds
    windows = [(meta(m, "datalake/window_lo"), meta(m, "datalake/window_hi")) for m in (first, second)]
    assert meta(second, "dagster/row_count") == 1, (stamped, windows)
    assert "v2" in h.bronze("t").column("v").to_pylist()


@pytest.mark.parametrize(("lag", "warned"), [("0.1", True), ("1", False)])
def test_a_lag_under_one_second_warns_in_each_run(harness: BronzeHarness, lag: str, warned: bool) -> None:
    h = harness
    h.extra_env["DATALAKE_EXTRACT_LAG_SECONDS"] = lag
    _events(h)
    h.run("events")
    run = h.instance.get_runs(limit=1)[0]
    warnings = [
        e.user_message
        for e in h.instance.all_logs(run.run_id)
        if e.level == logging.WARNING and "set DATALAKE_EXTRACT_LAG_SECONDS to 1 or more" in e.user_message
    ]
    assert bool(warnings) is warned
    if warned:
        assert warnings[0].startswith("edge_test.events: the extraction lag is 0.1 s: a row stamped by NOW()")


def test_late_commit_is_read_by_a_later_run(harness: BronzeHarness) -> None:
    h = harness
    _events(h)
    # innodb_trx reports a transaction's start to the second, so 'early' is clearly before it.
    h.sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('early', NOW(6) - INTERVAL 2 SECOND)")
    late = h.admin.connect().execution_options(isolation_level="REPEATABLE READ")
    try:
        transaction = late.begin()
        late.exec_driver_sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('late', NOW(6))")
        time.sleep(0.2)
        h.sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('after', NOW(6))")
        time.sleep(0.05)
        first = h.run("events")  # the open transaction caps hi at its start
        transaction.commit()
    finally:
        late.close()
    # InnoDB refreshes information_schema.innodb_trx at most every 0.1 s: read sooner, it still
    # lists the committed transaction (the second run then took lo for hi and read nothing).
    time.sleep(0.15)
    second = h.run("events")
    payloads = sorted(h.bronze("events").column("payload").to_pylist())
    windows = [
        (meta(m, "datalake/window_lo"), meta(m, "datalake/window_hi"), meta(m, "dagster/row_count"))
        for m in (first, second)
    ]
    assert "late" in payloads, windows
    assert meta(first, "dagster/row_count") == 1  # 'early' only: hi stops before the open transaction
    assert meta(second, "dagster/row_count") == 2  # 'late' and 'after'
    assert sorted(payloads) == ["after", "early", "late"]


def test_an_integer_cursor_dated_by_a_date_column_loses_no_late_commit(harness: BronzeHarness) -> None:
    """A DATE date_column stamps every id of today as older than an open transaction's start,
    also those allocated after it: the ids read are those of days before today."""
    h = harness
    h.sql(
        f"""CREATE TABLE {SCHEMA}.orders (id INT AUTO_INCREMENT PRIMARY KEY, payload VARCHAR(16),
            created DATE NOT NULL DEFAULT (CURRENT_DATE))"""
    )
    h.register(
        table="orders", primary_key=["id"], cursor={"column": "id", "kind": "integer"}, date_column="created"
    )
    h.sql(
        f"INSERT INTO {SCHEMA}.orders (payload, created) VALUES ('yesterday', CURRENT_DATE - INTERVAL 1 DAY)"
    )
    assert h.read(h.run("orders")).column("payload").to_pylist() == ["yesterday"]
    late = h.admin.connect().execution_options(isolation_level="REPEATABLE READ")
    try:
        transaction = late.begin()
        late.exec_driver_sql(f"INSERT INTO {SCHEMA}.orders (payload) VALUES ('late')")  # id 2, open
        time.sleep(1.2)  # innodb_trx.trx_started has whole seconds
        h.sql(f"INSERT INTO {SCHEMA}.orders (payload) VALUES ('after')")  # id 3, committed
        today = h.run("orders")
        transaction.commit()
    finally:
        late.close()
    assert meta(today, "dagster/row_count") == 0  # today's ids wait for tomorrow
    # A day later (the rows' dates moved back one day instead):
    h.sql(f"UPDATE {SCHEMA}.orders SET created = created - INTERVAL 1 DAY")
    time.sleep(0.15)
    h.run("orders")
    assert sorted(h.bronze("orders").column("payload").to_pylist()) == ["after", "late", "yesterday"]


def test_freshness_fails_when_an_open_transaction_holds_the_data_back_while_runs_land(
    harness: BronzeHarness,
) -> None:
    """A forgotten session's open write caps every window's hi at its start: runs land on time and
    read nothing new, so the check measures the data's age (``datalake/complete_until``)."""
    h = harness
    _events(h)
    h.extra_env.update(DATALAKE_BRONZE_FRESHNESS_HOURS="0.001")  # 3.6 s
    h.run("events")
    assert h.check("events", "incremental_freshness").passed
    stuck = h.admin.connect().execution_options(isolation_level="REPEATABLE READ")
    try:
        transaction = stuck.begin()
        stuck.exec_driver_sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('stuck', NOW(6))")
        time.sleep(5)
        landed = h.run("events")
        check = h.check("events", "incremental_freshness")
        transaction.rollback()
    finally:
        stuck.close()
    assert meta(landed, COMPLETE_UNTIL_KEY) == meta(landed, "datalake/window_hi")
    assert not check.passed, check.description
    assert "rows up to" in (check.description or "")
    time.sleep(0.15)
    h.run("events")
    assert h.check("events", "incremental_freshness").passed


def test_idle_and_read_only_transactions_do_not_hold_hi_back(harness: BronzeHarness) -> None:
    """An idle BEGIN that has written nothing (a pooled connection) and a read-only snapshot (a
    report, another extraction) cannot commit rows stamped before now: rows written after they
    began are read by the run."""
    h = harness
    _events(h)
    idle = h.admin.connect().execution_options(isolation_level="REPEATABLE READ")
    reader = h.admin.connect()
    try:
        idle.begin()
        idle.exec_driver_sql(f"SELECT count(*) FROM {SCHEMA}.events").all()  # a snapshot, no writes
        reader.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        reader.exec_driver_sql(f"SELECT count(*) FROM {SCHEMA}.events").all()
        open_ones = h.sql("SELECT count(*) FROM information_schema.innodb_trx")[0][0]
        assert open_ones >= 2  # both are open transactions to InnoDB
        time.sleep(1.1)  # trx_started has whole seconds
        h.sql(
            f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('after-them', NOW(6) - INTERVAL 0.5 SECOND)"
        )
        run = h.run("events")
    finally:
        idle.close()
        reader.close()
    assert meta(run, "dagster/row_count") == 1
    assert h.bronze("events").column("payload").to_pylist() == ["after-them"]


def test_a_source_user_without_process_is_warned_of_uncapped_windows(
    harness: BronzeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without PROCESS, innodb_trx is refused and hi is not capped at open transactions: the run
    goes on, and says so as a warning (it was an INFO line)."""
    h = harness
    _events(h)
    h.sql("DROP USER IF EXISTS 'select_only'@'%'")
    h.sql("CREATE USER 'select_only'@'%' IDENTIFIED BY 'select-only-pw'")
    h.sql(f"GRANT SELECT ON {SCHEMA}.* TO 'select_only'@'%'")
    monkeypatch.setenv("DATALAKE_MYSQL_PASSWORD", "select-only-pw")
    h.extra_env.update(DATALAKE_MYSQL_USER="select_only")
    h.sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('a', NOW(6) - INTERVAL 1 SECOND)")
    assert meta(h.run("events"), "dagster/row_count") == 1
    (run,) = h.instance.get_runs(limit=1)
    warnings = [
        r.user_message
        for r in h.instance.all_logs(run.run_id)
        if r.level == logging.WARNING and "innodb_trx" in r.user_message
    ]
    assert len(warnings) == 1 and "lacks PROCESS" in warnings[0], warnings


def test_an_overlapping_incremental_run_never_moves_the_watermark_back(
    harness: BronzeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two incremental runs of a table at once (the two schedules, a UI materialization): the one
    that started first lands last and kept its older hi, moving the watermark back."""
    import datalake.io_managers as io_managers

    h = harness
    _events(h)
    h.sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('a', NOW(6) - INTERVAL 1 SECOND)")
    original = io_managers._write_bronze
    inner: list[dg.AssetMaterialization | None] = []

    def write_then_let_another_run_land(*args: Any, **kwargs: Any) -> Any:
        written = original(*args, **kwargs)
        if not inner:  # the outer run's file is written; another run lands before it commits
            inner.append(None)
            h.sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('b', NOW(6))")
            time.sleep(0.05)
            inner[0] = h.run("events")
        return written

    monkeypatch.setattr(io_managers, "_write_bronze", write_then_let_another_run_land)
    outer = h.run("events")
    monkeypatch.setattr(io_managers, "_write_bronze", original)
    newer = meta(inner[0], WATERMARK_KEY)
    assert meta(outer, "datalake/window_hi") < newer
    assert meta(outer, WATERMARK_KEY) == newer
    after = h.run("events")
    assert meta(after, "datalake/window_lo") == newer and meta(after, "dagster/row_count") == 0


def test_rerun_without_source_change_reads_nothing(harness: BronzeHarness) -> None:
    h = harness
    _events(h)
    h.sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('a', '2024-05-01 10:00:00.123456')")
    first = h.run("events")
    second = h.run("events")
    assert meta(first, "dagster/row_count") == 1
    assert meta(second, "dagster/row_count") == 0
    assert h.bronze("events").column("updated_at").to_pylist() == [
        dt.datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
    ]


@pytest.mark.parametrize("cursor", ["id", "updated_at"])
def test_a_window_without_lower_bound_scans_the_table_and_a_later_one_reads_the_cursor_range(
    mariadb_server: MariaDBServer, tmp_path: Path, cursor: str
) -> None:
    """A first run or full refresh reads everything below ``hi``: walking the cursor's index for
    it costs the server more than a table scan. A window from a watermark reads the index range."""
    from datalake.arrow_reader import statement
    from datalake.extract import Window, WindowKind, plan_extraction
    from datalake.specs import TableSpec

    h = BronzeHarness(server=mariadb_server, root=tmp_path, reader="auto")
    _events(h)
    h.sql(
        f"INSERT INTO {SCHEMA}.events (payload, updated_at) SELECT 'p', "
        f"TIMESTAMP '2024-05-01 00:00:00' + INTERVAL seq SECOND FROM {SCHEMA}.seq_1_to_5000"
    )
    kind = "integer" if cursor == "id" else "timestamp"
    spec = TableSpec.model_validate(
        {**h.tables[0], "cursor": {"column": cursor, "kind": kind}, "date_column": "updated_at"}
    )
    near_end = 4990 if cursor == "id" else dt.datetime(2024, 5, 1, 1, 23, 10)
    hi = 5001 if cursor == "id" else dt.datetime(2030, 1, 1)
    engine = sa.create_engine(h.server.url())
    with engine.connect() as conn:
        access = {}
        for name, window, lo in (
            ("first run", Window(WindowKind.INCREMENTAL), None),
            ("full refresh", Window(WindowKind.FULL_REFRESH), None),
            ("from a watermark", Window(WindowKind.INCREMENTAL), near_end),
        ):
            plan = plan_extraction(conn, spec, window)
            selects = {
                # The Arrow-native reader's statement, and the row reader's (bounds as literals).
                "arrow": statement(conn.dialect, plan, lo, hi).split(" FOR ", 1)[-1],
                "rows": str(
                    plan.select(list(plan.table.c), lo, hi).compile(
                        dialect=conn.dialect, compile_kwargs={"literal_binds": True}
                    )
                ),
            }
            for reader, sql in selects.items():
                (row,) = conn.exec_driver_sql("EXPLAIN " + sql).mappings().all()
                access[name, reader] = row["type"]
                assert len(conn.exec_driver_sql(sql).all()) == (5000 if lo is None else 11), (name, reader)
    engine.dispose()
    h.dispose()
    for reader in ("arrow", "rows"):
        assert access["first run", reader] == "ALL"
        assert access["full refresh", reader] == "ALL"
        assert access["from a watermark", reader] == "range"


def test_a_view_is_extracted_on_its_first_run_and_a_full_refresh(harness: BronzeHarness) -> None:
    """A view takes no index hint: the whole-table read of a first run stays a plain SELECT. Its
    ``NULL AS x`` placeholder column (MYSQL_TYPE_NULL on the wire) is read as NULL binary."""
    h = harness
    _events(h)
    h.sql(
        f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('a', '2024-05-01 10:00:00'), "
        "('b', '2024-05-02 10:00:00')"
    )
    h.sql(f"CREATE VIEW {SCHEMA}.events_v AS SELECT *, NULL AS note FROM {SCHEMA}.events")
    h.register(table="events_v", primary_key=["id"], cursor={"column": "updated_at"})
    first = h.run("events_v")
    assert meta(first, "dagster/row_count") == 2
    assert h.read(first).column("note").to_pylist() == [None, None]
    assert meta(h.run("events_v", config={"mode": "full_refresh"}), "dagster/row_count") == 2


@pytest.mark.parametrize("cursor_type", ["DATETIME", "TIMESTAMP NULL", "DATE"])
def test_a_cursor_of_whole_seconds_or_days_loses_nothing_written_in_the_boundary_second(
    harness: BronzeHarness, cursor_type: str
) -> None:
    """``hi`` is the source's clock to the microsecond; a row written after it in the same second
    (day) gets a cursor below it. The next window starts at ``hi`` cut to the column's precision."""
    h = harness
    h.sql(f"CREATE TABLE {SCHEMA}.coarse (id INT PRIMARY KEY, v VARCHAR(8), updated_at {cursor_type})")
    h.sql(f"INSERT INTO {SCHEMA}.coarse VALUES (1, 'v1', NOW())")
    h.register(table="coarse", primary_key=["id"], cursor={"column": "updated_at"})
    first = h.run("coarse")
    hi = dt.datetime.fromisoformat(meta(first, "datalake/window_hi")).astimezone(dt.UTC).replace(tzinfo=None)
    boundary = hi.date().isoformat() if cursor_type == "DATE" else hi.replace(microsecond=0).isoformat(" ")
    # Committed after the first run, stamped in the second (day) its hi fell in: below hi.
    h.sql(f"UPDATE {SCHEMA}.coarse SET v = 'v2', updated_at = :b WHERE id = 1", b=boundary)
    h.sql(f"INSERT INTO {SCHEMA}.coarse VALUES (2, 'new', :b)", b=boundary)
    second = h.run("coarse")
    assert sorted(h.read(second).select(["id", "v"]).to_pylist(), key=lambda r: r["id"]) == [
        {"id": 1, "v": "v2"},
        {"id": 2, "v": "new"},
    ]
    assert meta(second, "datalake/window_lo") < meta(first, WATERMARK_KEY)  # the boundary again


def test_doubles_and_floats_are_read_as_the_server_holds_them(harness: BronzeHarness) -> None:
    """SQLAlchemy's MySQL DOUBLE hands the row reader a Decimal rounded to 10 places, and the text
    protocol renders FLOAT with 6 significant digits and FLOAT(M,D)/DOUBLE(M,D) with D decimals;
    the Arrow reader gets the stored bits. Both must write the stored value."""
    h = harness
    h.sql(
        f"CREATE TABLE {SCHEMA}.measures (id INT PRIMARY KEY, d DOUBLE, r REAL, f FLOAT, "
        "f72 FLOAT(7,2), d102 DOUBLE(10,2), updated_at DATETIME(6))"
    )
    values = [1e-11, 3.141592653589793, -9.87654321012e-07, 123456.78901234567, 2.5e-300]
    singles = [16777216.0, 0.1234567, 3.4028234e38, 1.17549435e-38, -1.4e-45]
    scaled = [(12345.67, -0.01), (0.1, 1.1), (-99999.99, 12345678.91), (0.0, 0.0), (1.0, 2.0)]
    for i, (value, single, (f72, d102)) in enumerate(zip(values, singles, scaled, strict=True)):
        h.sql(
            f"INSERT INTO {SCHEMA}.measures VALUES (:i, :v, :v, :f, :f72, :d102, NOW(6))",
            i=i,
            v=value,
            f=single,
            f72=f72,
            d102=d102,
        )
    stored = h.sql(
        f"SELECT CAST(f72 AS DOUBLE), CAST(d102 AS DOUBLE), CAST(f AS DOUBLE) FROM {SCHEMA}.measures ORDER BY id"
    )
    h.register(table="measures", primary_key=["id"], cursor={"column": "updated_at"})
    table = h.read(h.run("measures")).sort_by("id")
    assert table.schema.field("f").type == pa.float32()

    assert table.column("d").to_pylist() == table.column("r").to_pylist() == values
    # The server's FLOAT is IEEE single: what it holds is the value rounded to float32.
    assert (
        table.column("f").to_pylist() == pa.array(singles, pa.float32()).to_pylist() == [r[2] for r in stored]
    )
    assert [(r["f72"], r["d102"]) for r in table.select(["f72", "d102"]).to_pylist()] == [
        (r[0], r[1]) for r in stored
    ]


def test_identifiers_that_need_quoting_are_read_by_both_readers(harness: BronzeHarness) -> None:
    """Reserved words, mixed case, spaces, ``%`` (doubled for PyMySQL's paramstyle, not for
    connectorx) and a backtick (doubled by MySQL's reflection) in column names."""
    h = harness
    h.sql(
        f"""CREATE TABLE {SCHEMA}.`order` (`key` INT PRIMARY KEY, `Unit Price` DECIMAL(10, 2),
            `vat%` DECIMAL(5, 2), `a%%b` VARCHAR(8), `x``y` VARCHAR(8), `select` DATETIME(6) NULL)"""
    )
    h.sql(
        f"INSERT INTO {SCHEMA}.`order` VALUES (1, 9.99, 19.00, 'p', 'q', '2024-05-01'), "
        "(2, 5.00, 7.00, 'r', NULL, '2024-05-02')"
    )
    h.register(table="order", primary_key=["key"], cursor={"column": "select"})
    m = h.run("order")
    rows = h.read(m).select(["key", "Unit Price", "vat%", "a%%b", "x`y"]).to_pylist()
    assert sorted(rows, key=lambda r: r["key"]) == [
        {"key": 1, "Unit Price": Decimal("9.99"), "vat%": Decimal("19.00"), "a%%b": "p", "x`y": "q"},
        {"key": 2, "Unit Price": Decimal("5.00"), "vat%": Decimal("7.00"), "a%%b": "r", "x`y": None},
    ]
    # The window bounds and the delete reconciliation quote them too.
    h.sql(f"DELETE FROM {SCHEMA}.`order` WHERE `key` = 2")
    again = h.run("order", config={"reconcile_deletes": True})
    assert meta(again, "datalake/deletes_found") == 1


def test_session_time_zone_berlin_across_dst(harness: BronzeHarness) -> None:
    """A server whose default time zone is Europe/Berlin: instants still come out in UTC."""
    h = harness
    h.sql(
        f"CREATE TABLE {SCHEMA}.tz (id INT PRIMARY KEY, ts TIMESTAMP(6) NULL, updated_at DATETIME(6) NOT NULL)"
    )
    h.register(table="tz", primary_key=["id"], cursor={"column": "updated_at"})
    with h.admin.connect() as conn:
        conn.exec_driver_sql("SET time_zone = 'Europe/Berlin'")
        # 2024-03-31: Berlin jumps from 02:00 CET to 03:00 CEST.
        conn.exec_driver_sql(
            f"INSERT INTO {SCHEMA}.tz VALUES (1, '2024-03-31 01:59:59.500000', '2024-01-01'), "
            "(2, '2024-03-31 03:00:00.500000', '2024-01-01'), (3, '2024-10-27 03:30:00', '2024-01-01')"
        )
    h.sql("SET GLOBAL time_zone = 'Europe/Berlin'")
    try:
        table = h.read(h.run("tz"))
    finally:
        h.sql("SET GLOBAL time_zone = '+00:00'")
    got = {r["id"]: r["ts"] for r in table.to_pylist()}
    assert got[1] == dt.datetime(2024, 3, 31, 0, 59, 59, 500000, tzinfo=UTC)
    assert got[2] == dt.datetime(2024, 3, 31, 1, 0, 0, 500000, tzinfo=UTC)
    assert got[3] == dt.datetime(2024, 10, 27, 2, 30, tzinfo=UTC)


@pytest.mark.parametrize("policy", ["capture", "skip"])
def test_null_cursor_rows_follow_the_policy(harness: BronzeHarness, policy: str) -> None:
    h = harness
    _events(h)
    h.tables[-1]["null_cursor"] = policy
    with h.admin.connect() as conn:
        conn.exec_driver_sql("SET SESSION sql_mode = ''")  # legacy rows: a zero date, in a NULLable column
        conn.exec_driver_sql(
            f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES "
            "('legacy-1', NULL), ('legacy-2', NULL), ('zero', '0000-00-00 00:00:00'), ('dated', '2024-05-01')"
        )
    first = h.run("events")
    second = h.run("events")
    full = h.run("events", config={"mode": "full_refresh"})
    check = h.check("events", "null_cursor_rows")
    # A zero date is no window's (it sorts below every lo, and is not IS NULL): a NULL cursor.
    assert check.metadata["null_cursor_rows"].value == 3
    if policy == "capture":
        # Every incremental run reads them again (silver dedups); never silently lost.
        assert meta(first, "dagster/row_count") == 4 and meta(first, "datalake/null_cursor_rows") == 3
        assert meta(second, "dagster/row_count") == 3
        assert meta(full, "dagster/row_count") == 4  # a full refresh is full
        assert check.passed
    else:
        # NULLs are never read; the zero date only by windows with no lower bound (the first
        # run, a full refresh), where it sorts below hi.
        assert meta(first, "dagster/row_count") == 2 and meta(first, "datalake/null_cursor_rows") == 1
        assert meta(second, "dagster/row_count") == 0
        assert meta(full, "dagster/row_count") == 2
        assert not check.passed


def test_a_scheduled_run_executing_after_midnight_is_its_tick_days_incremental_run(
    harness: BronzeHarness,
) -> None:
    """The 23:15 tick's run waits (for the V3 pool, a free run slot) until after midnight: it is
    still that day's incremental run — not a stateless re-read of the whole past day."""
    from datalake.assets.bronze import SCHEDULED_DAY_TAG

    h = harness
    _events(h)
    h.sql(
        f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('a', UTC_TIMESTAMP(6) - INTERVAL 1 MINUTE)"
    )
    first = h.run("events")
    h.sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('b', UTC_TIMESTAMP(6))")
    time.sleep(0.05)
    settings = h.settings()
    defs = build_definitions(settings)
    yesterday = dt.datetime.now(settings.tz).date() - dt.timedelta(days=1)
    tick = dt.datetime.combine(yesterday, dt.time(23, 15), settings.tz)
    with dg.build_schedule_context(
        scheduled_execution_time=tick, instance=h.instance, repository_def=defs.get_repository_def()
    ) as context:
        (request,) = defs.resolve_schedule_def("bronze_incremental").evaluate_tick(context).run_requests or []
    assert request.partition_key == yesterday.isoformat()
    result = defs.resolve_job_def("bronze_job").execute_in_process(
        partition_key=request.partition_key, instance=h.instance, tags=request.tags
    )
    (event,) = result.get_asset_materialization_events()
    m = event.materialization
    assert meta(m, "datalake/window_kind") == "incremental"
    assert meta(m, "datalake/window_lo") == meta(first, WATERMARK_KEY)
    assert meta(m, "dagster/row_count") == 1  # 'b' only: from the watermark on, not the past day
    assert meta(m, WATERMARK_KEY) == meta(m, "datalake/window_hi")  # the watermark moves
    # A re-execution of an older scheduled run (tags kept) repairs its day statelessly, as before.
    old_day = (yesterday - dt.timedelta(days=2)).isoformat()
    result = defs.resolve_job_def("bronze_job").execute_in_process(
        partition_key=old_day, instance=h.instance, tags={**request.tags, SCHEDULED_DAY_TAG: old_day}
    )
    (event,) = result.get_asset_materialization_events()
    assert meta(event.materialization, "datalake/window_kind") == "backfill"
    assert WATERMARK_KEY not in event.materialization.metadata


def test_backfill_is_stateless_and_holds_exactly_that_day(harness: BronzeHarness) -> None:
    h = harness
    _events(h)
    h.sql(
        f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES "
        "('before', '2024-05-01 23:59:59.999999'), ('in-1', '2024-05-02 00:00:00'), "
        "('in-2', '2024-05-02 23:59:59.999999'), ('after', '2024-05-03 00:00:00'), ('null', NULL)"
    )
    incremental = h.run("events")
    committed = meta(incremental, WATERMARK_KEY)
    backfill = h.run("events", partition="2024-05-02", tags={"dagster/backfill": "test"})
    assert sorted(h.read(backfill).column("payload").to_pylist()) == ["in-1", "in-2"]
    assert meta(backfill, WATERMARK_KEY) is None
    assert meta(backfill, "datalake/window_kind") == "backfill"
    # The next incremental run still starts from the watermark the incremental run committed.
    after = h.run("events")
    assert meta(after, "datalake/window_lo") == committed


def test_run_config_full_refresh_explicit_window_and_set_watermark(harness: BronzeHarness) -> None:
    h = harness
    _events(h)
    h.sql(
        f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES "
        "('a', '2024-05-01'), ('b', '2024-05-02'), ('c', '2024-05-03')"
    )
    assert meta(h.run("events"), "dagster/row_count") == 3
    window = h.run(
        "events",
        config={
            "mode": "window",
            "window_start": "2024-05-02T00:00:00+00:00",
            "window_end": "2024-05-03T00:00:00+00:00",
        },
    )
    assert h.read(window).column("payload").to_pylist() == ["b"]
    assert meta(window, WATERMARK_KEY) is None
    reset = h.run("events", config={"mode": "incremental", "set_watermark": "2024-05-02T00:00:00+00:00"})
    assert sorted(h.read(reset).column("payload").to_pylist()) == ["b", "c"]
    full = h.run("events", config={"mode": "full_refresh"})
    assert meta(full, "dagster/row_count") == 3 and meta(full, WATERMARK_KEY) is not None


@pytest.mark.parametrize("id_type", ["BIGINT", "INT UNSIGNED"])
def test_an_integer_cursor_commits_when_no_row_is_older_than_the_lag_so_a_truncate_loses_nothing(
    harness: BronzeHarness, id_type: str
) -> None:
    """An empty table's first run commits a watermark that reads every later row; a full refresh
    after a truncate (ids handed out again from 1) resets the committed watermark."""
    h = harness
    h.sql(
        f"""CREATE TABLE {SCHEMA}.orders (id {id_type} PRIMARY KEY AUTO_INCREMENT, v VARCHAR(10),
            created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"""
    )
    h.register(
        table="orders",
        primary_key=["id"],
        cursor={"column": "id", "kind": "integer"},
        date_column="created_at",
    )
    lowest = "0" if "UNSIGNED" in id_type else str(-(2**63))
    empty = h.run("orders")
    assert meta(empty, "dagster/row_count") == 0 and meta(empty, WATERMARK_KEY) == lowest
    h.sql(f"INSERT INTO {SCHEMA}.orders (v) VALUES ('o1'), ('o2'), ('o3'), ('o4'), ('o5')")
    time.sleep(0.05)
    assert meta(h.run("orders"), WATERMARK_KEY) == "6"
    h.sql(f"TRUNCATE TABLE {SCHEMA}.orders")
    full = h.run("orders", config={"mode": "full_refresh"})
    assert meta(full, "dagster/row_count") == 0 and meta(full, WATERMARK_KEY) == lowest
    h.sql(f"INSERT INTO {SCHEMA}.orders (v) VALUES ('n1'), ('n2')")
    time.sleep(0.05)
    after = h.run("orders")
    assert sorted(h.read(after).column("v").to_pylist()) == ["n1", "n2"]
    assert meta(after, WATERMARK_KEY) == "3"


def test_added_column_appears_in_new_files_and_reads_by_name(harness: BronzeHarness) -> None:
    import duckdb

    h = harness
    _events(h)
    h.sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('old', '2024-05-01')")
    h.run("events")
    h.sql(f"ALTER TABLE {SCHEMA}.events ADD COLUMN region VARCHAR(8) NULL AFTER payload")
    h.sql(f"INSERT INTO {SCHEMA}.events (payload, region, updated_at) VALUES ('new', 'eu', NOW(6))")
    time.sleep(0.05)
    newer = h.run("events")
    assert "region" in h.read(newer).column_names
    files = sorted(str(p) for p in (h.root / "lake" / "bronze" / "events").rglob("*.parquet"))
    rows = (
        duckdb.connect()
        .execute(
            "SELECT payload, region FROM read_parquet(?, union_by_name = true) ORDER BY payload", [files]
        )
        .fetchall()
    )
    assert rows == [("new", "eu"), ("old", None)]


def test_arrow_reader_is_used_for_mysql_and_is_exact_on_the_demo_schema(
    mariadb_server: MariaDBServer,
    v3_mariadb: Callable[..., sa.Engine],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both readers produce the same bronze rows and schema for every demo table."""
    monkeypatch.setenv("DATALAKE_MYSQL_PASSWORD", mariadb_server.ro_password)
    from datalake.settings import DEFAULT_REGISTRY
    from datalake.specs import load_registry

    v3_mariadb(seed=11, cdr_rows=1500)
    results = {}
    for reader in ("auto", "rows"):
        (tmp_path / reader).mkdir()
        h = BronzeHarness(server=mariadb_server, root=tmp_path / reader, reader=reader)
        h.tables = [
            s.model_dump(by_alias=True, exclude_none=True, mode="json")
            for s in load_registry(DEFAULT_REGISTRY)
        ]
        tables = {}
        for spec in h.tables:
            m = h.run(spec["table"])
            assert meta(m, "datalake/reader") == ("arrow" if reader == "auto" else "rows")
            data = h.read(m).drop_columns(["_datalake_run_id", "_datalake_extracted_at", "_datalake_row_seq"])
            tables[spec["table"]] = data.sort_by([(k, "ascending") for k in spec["primary_key"]])
        results[reader] = tables
        h.dispose()
    for name, arrow_table in results["auto"].items():
        rows_table = results["rows"][name]
        assert arrow_table.schema == rows_table.schema, name
        assert arrow_table.equals(rows_table), name


def test_an_arrow_extraction_never_imports_pandas(
    mariadb_server: MariaDBServer, v3_mariadb: Callable[..., sa.Engine], tmp_path: Path
) -> None:
    """pyarrow imports pandas, wherever it is installed, once it converts Python values: ~1 s and
    ~60 MB of a bronze run (as in the benchmark's environment). A run of the CDR table (ENUM labels
    included) in a process where importing pandas leaves a trace."""
    v3_mariadb(seed=5, cdr_rows=2000)
    fake = tmp_path / "fake" / "pandas"
    fake.mkdir(parents=True)
    trace = tmp_path / "pandas-imported"
    (fake / "__init__.py").write_text(
        f"import pathlib, traceback\npathlib.Path({str(trace)!r}).write_text(''.join(traceback.format_stack()))\n"
        "raise ImportError('not installed')\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.extract_tools",
            "project",
            mariadb_server.url(),
            "v3_billing",
            "billing_cdr",
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "fake")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["rows"] == 2000
    assert not trace.exists(), trace.read_text()
