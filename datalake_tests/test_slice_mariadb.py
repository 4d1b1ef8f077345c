"""The thin slice end to end against a real MariaDB: bronze → silver → Rev-Sci.

Bronze row counts are checked against COUNT(*) on the source; silver and Rev-Sci numbers
against SQL run directly on the source.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import dagster as dg
import polars as pl
import pytest
import sqlalchemy as sa

from datalake.cli import run_downstream
from datalake.definitions import BRONZE_JOB, build_definitions
from datalake.specs import Mode, load_registry
from datalake.watermark import WATERMARK_KEY

pytestmark = pytest.mark.mariadb


def _materializations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetMaterialization]:
    return {
        e.materialization.asset_key.to_user_string(): e.materialization
        for e in result.get_asset_materialization_events()
    }


def _rows(engine: sa.Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql), params)]


def test_slice_end_to_end(v3_mariadb, mariadb_settings) -> None:
    today = dt.datetime.now(dt.UTC).date()
    source = v3_mariadb(cdr_rows=3_000, anchor=dt.datetime.combine(today, dt.time()))
    defs = build_definitions(mariadb_settings)
    instance = dg.DagsterInstance.ephemeral()
    bronze = defs.resolve_job_def(BRONZE_JOB)
    specs = {s.asset_name: s for s in load_registry(mariadb_settings.registry_path)}

    # A past ingestion date: the stateless window [D, D+1) over each table's date column.
    day = today - dt.timedelta(days=3)
    past = _materializations(bronze.execute_in_process(partition_key=day.isoformat(), instance=instance))
    lo, hi = dt.datetime.combine(day, dt.time()), dt.datetime.combine(day + dt.timedelta(days=1), dt.time())
    for name, spec in specs.items():
        materialization = past[f"bronze/{name}"]
        if spec.mode is Mode.SNAPSHOT:
            expected = _rows(source, f"SELECT COUNT(*) FROM {spec.source_schema}.{spec.table}")[0][0]
        else:
            expected = _rows(
                source,
                f"SELECT COUNT(*) FROM {spec.source_schema}.{spec.table} WHERE {spec.window_column} >= :lo AND {spec.window_column} < :hi",
                lo=lo,
                hi=hi,
            )[0][0]
        assert materialization.metadata["dagster/row_count"].value == expected, name
        assert WATERMARK_KEY not in materialization.metadata, (
            f"{name}: a backfill must not move the watermark"
        )
    assert int(past["bronze/billing_cdr"].metadata["dagster/row_count"].value) > 0  # type: ignore[arg-type]

    # Today's run is incremental: with no committed watermark it reads everything below hi.
    first = _materializations(bronze.execute_in_process(partition_key=today.isoformat(), instance=instance))
    for name, spec in specs.items():
        count = _rows(source, f"SELECT COUNT(*) FROM {spec.source_schema}.{spec.table}")[0][0]
        materialization = first[f"bronze/{name}"]
        assert materialization.metadata["dagster/row_count"].value == count, name
        uri = str(materialization.metadata["dagster/uri"].value)
        assert f"/bronze/{name}/ingestion_date={today.isoformat()}/{name}_" in uri
        assert pl.read_parquet(uri).height == count
        assert (WATERMARK_KEY in materialization.metadata) == (spec.mode is Mode.INCREMENTAL), name

    # A second incremental run with no source change reads nothing (and the watermark holds).
    second = _materializations(bronze.execute_in_process(partition_key=today.isoformat(), instance=instance))
    for name, spec in specs.items():
        if spec.mode is Mode.INCREMENTAL and spec.null_cursor.value == "skip":
            assert second[f"bronze/{name}"].metadata["dagster/row_count"].value == 0, name
    assert second["bronze/billing_cdr"].metadata["dagster/row_count"].value == 0
    assert second["bronze/invoice"].metadata["dagster/row_count"].value == 0
    assert (
        second["bronze/billing_cdr"].metadata[WATERMARK_KEY].value
        == first["bronze/billing_cdr"].metadata[WATERMARK_KEY].value
    )

    # Silver and Rev-Sci over every bronze file (duplicates across runs are deduplicated).
    rows = run_downstream(
        defs, mariadb_settings, instance, first_day=today - dt.timedelta(days=31), last_day=today
    )
    uris = {asset: uri for asset, _partition, _count, uri in rows}
    fact = pl.read_parquet(uris["silver/fact_invoice"])
    expected_fact = _rows(
        source,
        """
        SELECT COUNT(*), SUM(i.total_amount), SUM(d.tax_amount), SUM(d.line_count),
               SUM(s.status = 'paid')
        FROM v3_billing.invoice i
        LEFT JOIN v3_billing.invoice_status s ON s.invoice_id = i.invoice_id
        LEFT JOIN v3_billing.invoice_data d ON d.invoice_id = i.invoice_id
        """,
    )[0]
    assert fact.height == expected_fact[0]
    assert fact["invoice_id"].n_unique() == fact.height
    assert Decimal(str(fact["total_amount"].sum())) == expected_fact[1]
    assert Decimal(str(fact["tax_amount"].sum())) == expected_fact[2]
    assert fact["line_count"].sum() == expected_fact[3]
    assert (fact["status"] == "paid").sum() == expected_fact[4]
    assert fact.schema["total_amount"] == pl.Decimal(18, 4)

    partner_files = sorted({uri for asset, _p, _c, uri in rows if asset == "revsci/billing_usage_aggregated"})
    usage = pl.read_parquet(partner_files)
    assert {c: usage.schema[c] for c in ("cdr_count", "duration_seconds", "bytes_used")} == dict.fromkeys(
        ("cdr_count", "duration_seconds", "bytes_used"), pl.Int64
    )
    got = {
        row["partner_id"]: (row["cdr_count"], row["duration_seconds"], row["bytes_used"], row["cost"])
        for row in usage.group_by("partner_id")
        .agg(
            pl.col("cdr_count").sum(),
            pl.col("duration_seconds").sum(),
            pl.col("bytes_used").sum(),
            pl.col("cost").sum(),
        )
        .iter_rows(named=True)
    }
    expected_usage = {
        partner: (count, int(duration), int(bytes_used), cost)
        for partner, count, duration, bytes_used, cost in _rows(
            source,
            "SELECT partner_id, COUNT(*), SUM(duration_seconds), SUM(bytes_used), SUM(cost) "
            "FROM v3_billing.billing_cdr GROUP BY partner_id",
        )
    }
    assert got == expected_usage
    # one file per partner, under the vanguard_wholesale root
    assert len(partner_files) == len(expected_usage)
    assert all("/vanguard_wholesale/billing_usage_aggregated/" in uri for uri in partner_files)
