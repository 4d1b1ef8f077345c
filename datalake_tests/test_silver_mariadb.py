"""Silver and Rev-Sci equal the source after OLTP churn (inserts, updates, hard deletes).

Real MariaDB, real runs: bronze incremental runs with delete reconciliation after each round
of the generator's `mutate`, then silver and Rev-Sci; every current-state table is compared
with its source table by the generator's order-free checksum over all columns.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from datalake.cli import run_downstream
from datalake.definitions import BRONZE_JOB, build_definitions
from datalake.demo import schema as demo_schema
from datalake.demo.generator import checksum, mutate
from datalake.settings import Settings
from datalake.specs import Mode, load_registry

pytestmark = pytest.mark.mariadb


def _silver_checksum(path: Path, table: sa.Table, scratch: Path) -> str:
    """The generator's checksum of a silver Parquet file, via a scratch SQLite copy of the table."""
    scratch.mkdir(parents=True, exist_ok=True)
    engine = demo_schema.sqlite_engine(scratch)
    table.create(engine)
    data = pq.read_table(path)
    rows: list[dict[str, Any]] = []
    for row in data.to_pylist():
        for column in table.columns:
            value = row.get(column.name)
            if isinstance(value, dt.datetime) and value.tzinfo is not None:
                row[column.name] = value.astimezone(dt.UTC).replace(tzinfo=None)
            elif isinstance(column.type.dialect_impl(engine.dialect), sa.JSON) and isinstance(value, str):
                row[column.name] = json.loads(value)
        rows.append({c.name: row.get(c.name) for c in table.columns})
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys = OFF")  # one table alone: its parents aren't here
        if rows:
            conn.execute(table.insert(), rows)
        conn.commit()
    result = checksum(engine, table)
    engine.dispose()
    return result


def _uri(result: dg.ExecuteInProcessResult | list[Any], key: str) -> str:
    for row in result:  # type: ignore[union-attr]
        if row[0] == key:
            return row[3]
    raise KeyError(key)


def test_silver_equals_source_after_mutations(
    v3_mariadb: Any, mariadb_settings: Settings, tmp_path: Path
) -> None:
    today = dt.datetime.now(dt.UTC).date()
    source = v3_mariadb(cdr_rows=3_000, anchor=dt.datetime.combine(today, dt.time()))
    settings = mariadb_settings
    specs = load_registry(settings.registry_path)
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    bronze = defs.resolve_job_def(BRONZE_JOB)
    reconcile = {
        "ops": {
            f"bronze__{s.asset_name}": {"config": {"reconcile_deletes": True}}
            for s in specs
            if s.mode is Mode.INCREMENTAL
        }
    }
    bronze.execute_in_process(partition_key=today.isoformat(), instance=instance)
    deletes_found = 0
    for round_ in (1, 2, 3):
        changes = mutate(source, seed=5, round=round_)
        assert sum(c["deleted"] for c in changes.values()) > 0
        time.sleep(0.05)
        result = bronze.execute_in_process(
            partition_key=today.isoformat(), instance=instance, run_config=reconcile
        )
        for event in result.get_asset_materialization_events():
            found = event.materialization.metadata.get("datalake/deletes_found")
            deletes_found += int(found.value) if found is not None else 0  # type: ignore[arg-type]
    assert deletes_found > 0

    rows = run_downstream(defs, settings, instance, first_day=today - dt.timedelta(days=31), last_day=today)

    # Every current-state table equals its source table, all columns, exactly.
    tables = {t.name: t for t in demo_schema.TABLES}
    compared = 0
    for spec in specs:
        if spec.mode is not Mode.INCREMENTAL:
            continue
        silver = Path(_uri(rows, f"silver/{spec.asset_name}_current"))
        table = tables[spec.table]
        assert _silver_checksum(silver, table, tmp_path / "scratch" / spec.table) == checksum(
            source, table
        ), spec.table
        compared += 1
    assert compared == 11

    # A billing_cdr silver partition equals the source rows of that day.
    day = today - dt.timedelta(days=2)
    partition = pl.read_parquet(tmp_path / "lake" / "silver" / "billing_cdr" / f"{day.isoformat()}.parquet")
    with source.connect() as conn:
        expected = conn.execute(
            sa.text(
                "SELECT cdr_id, cost FROM v3_billing.billing_cdr WHERE started_at >= :lo AND started_at < :hi ORDER BY cdr_id"
            ),
            {
                "lo": dt.datetime.combine(day, dt.time()),
                "hi": dt.datetime.combine(day + dt.timedelta(days=1), dt.time()),
            },
        ).all()
    got = partition.sort("cdr_id").select("cdr_id", "cost").rows()
    assert len(got) == len(expected) > 0
    assert [(int(a), b) for a, b in got] == [(int(a), b) for a, b in expected]

    # Rev-Sci equals a direct SQL aggregate on the source, for every partner.
    usage = pl.read_parquet(
        list((tmp_path / "lake" / "vanguard_wholesale" / "billing_usage_aggregated").glob("*.parquet"))
    )
    got_usage = {
        (r["partner_id"], r["usage_date"], r["call_type"]): (
            r["cdr_count"],
            r["duration_seconds"],
            r["bytes_used"],
            r["cost"],
        )
        for r in usage.iter_rows(named=True)
    }
    with source.connect() as conn:
        direct = conn.exec_driver_sql(
            "SELECT partner_id, DATE(started_at), call_type, COUNT(*), SUM(duration_seconds), SUM(bytes_used), SUM(cost) "
            "FROM v3_billing.billing_cdr GROUP BY 1, 2, 3"
        ).all()
    expected_usage = {(int(p), d, c): (n, int(s), int(b), cost) for p, d, c, n, s, b, cost in direct}
    assert got_usage == expected_usage
