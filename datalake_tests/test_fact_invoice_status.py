"""fact_invoice against a real MariaDB: a status row replaced by delete + re-insert (new id).

The source keeps one status per invoice (UNIQUE(invoice_id)) but keys the row by
invoice_status_id; the hourly incremental bronze run does not see the delete, so silver's
``invoice_status_current`` holds both rows until the nightly reconciliation. fact_invoice must
still have one row per invoice, with the new status.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from datalake.definitions import build_definitions
from datalake_tests.bronze_harness import SCHEMA, BronzeHarness
from datalake_tests.conftest import bronze_harness
from datalake_tests.helpers import check_evaluations
from datalake_tests.services import MariaDBServer

pytestmark = pytest.mark.mariadb

SILVER_KEYS = ("invoice_current", "invoice_status_current", "invoice_data_current", "fact_invoice")


@pytest.fixture
def harness(
    mariadb_server: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[BronzeHarness]:
    yield from bronze_harness(mariadb_server, tmp_path, monkeypatch, "rows")


def _invoice_tables(h: BronzeHarness) -> None:
    h.sql(
        f"""CREATE TABLE {SCHEMA}.invoice (invoice_id BIGINT PRIMARY KEY, customer_id BIGINT,
        partner_id BIGINT, invoice_number VARCHAR(32), period_start DATE, period_end DATE,
        currency CHAR(3), total_amount DECIMAL(18,4),
        created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6))"""
    )
    h.sql(
        f"""CREATE TABLE {SCHEMA}.invoice_status (invoice_status_id BIGINT AUTO_INCREMENT PRIMARY KEY,
        invoice_id BIGINT NOT NULL UNIQUE, status VARCHAR(16), changed_at DATETIME(6),
        updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6))"""
    )
    h.sql(
        f"""CREATE TABLE {SCHEMA}.invoice_data (invoice_data_id BIGINT AUTO_INCREMENT PRIMARY KEY,
        invoice_id BIGINT NOT NULL UNIQUE, line_count INT, tax_amount DECIMAL(18,4),
        discount_amount DECIMAL(18,4),
        updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6))"""
    )
    for table, key in (
        ("invoice", "invoice_id"),
        ("invoice_status", "invoice_status_id"),
        ("invoice_data", "invoice_data_id"),
    ):
        h.register(table=table, primary_key=[key], cursor={"column": "updated_at", "kind": "timestamp"})


def _run_silver(h: BronzeHarness) -> dg.ExecuteInProcessResult:
    defs = build_definitions(h.settings())
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey(["silver", k]) for k in SILVER_KEYS}
    )
    return job.execute_in_process(instance=h.instance, raise_on_error=False)


def _silver(h: BronzeHarness, name: str, columns: str, key: str) -> list[tuple[object, ...]]:
    path = h.root / "lake" / "silver" / name / f"{name}.parquet"
    relation = duckdb.sql(f"SELECT {columns} FROM read_parquet('{path}') ORDER BY {key}")
    assert relation is not None  # a SELECT always yields a relation
    return relation.fetchall()


def test_status_replaced_under_a_new_id_keeps_one_fact_row_with_the_new_status(
    harness: BronzeHarness,
) -> None:
    h = harness
    _invoice_tables(h)
    h.sql(
        f"INSERT INTO {SCHEMA}.invoice (invoice_id, customer_id, partner_id, invoice_number, period_start, "
        "period_end, currency, total_amount) VALUES "
        "(1, 10, 100, 'INV-1', '2025-01-01', '2025-01-31', 'EUR', 99.5), "
        "(2, 11, 100, 'INV-2', '2025-01-01', '2025-01-31', 'EUR', 10)"
    )
    h.sql(
        f"INSERT INTO {SCHEMA}.invoice_status (invoice_status_id, invoice_id, status, changed_at) "
        "VALUES (1, 1, 'draft', NOW(6)), (2, 2, 'draft', NOW(6))"
    )
    h.sql(
        f"INSERT INTO {SCHEMA}.invoice_data (invoice_data_id, invoice_id, line_count, tax_amount, discount_amount) "
        "VALUES (1, 1, 3, 1, 0), (2, 2, 1, 1, 0)"
    )
    time.sleep(0.05)
    for table in ("invoice", "invoice_status", "invoice_data"):
        h.run(table)

    # The OLTP system replaces invoice 1's status row: delete, then insert under a new id.
    h.sql(f"DELETE FROM {SCHEMA}.invoice_status WHERE invoice_status_id = 1")
    h.sql(
        f"INSERT INTO {SCHEMA}.invoice_status (invoice_id, status, changed_at) VALUES (1, 'issued', NOW(6))"
    )
    assert h.sql(f"SELECT invoice_status_id, invoice_id, status FROM {SCHEMA}.invoice_status ORDER BY 1") == [
        (2, 2, "draft"),
        (3, 1, "issued"),
    ]
    time.sleep(0.05)

    # The hourly incremental run: no delete reconciliation, so the old row stays current in silver.
    h.run("invoice_status")
    result = _run_silver(h)
    status_current = _silver(h, "invoice_status_current", "invoice_status_id, invoice_id, status", "1")
    assert status_current == [(1, 1, "draft"), (2, 2, "draft"), (3, 1, "issued")]

    assert _silver(h, "fact_invoice", "invoice_id, status, line_count", "invoice_id") == [
        (1, "issued", 3),
        (2, "draft", 1),
    ]
    check = check_evaluations(result)[("silver/fact_invoice", "primary_key_unique_and_not_null")]
    assert check.passed, check.metadata
    assert result.success
