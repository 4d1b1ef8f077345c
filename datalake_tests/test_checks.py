"""Each asset check passes on good data and fails on data made to break it (embedded demo source)."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import yaml

from datalake.assets.revsci import PARTNERS, USAGE_KEY
from datalake.checks import primary_key_check
from datalake.definitions import BRONZE_JOB, REVSCI_JOB, SILVER_CDR_JOB, SILVER_JOB, build_definitions
from datalake.demo.generator import demo_engine
from datalake.lake import DuckDBResource
from datalake.settings import DEFAULT_REGISTRY, Settings, resolve_settings
from datalake_tests.helpers import check_evaluations, lake_env, run_checks


@pytest.fixture
def demo(tmp_path: Path) -> tuple[Settings, sa.Engine]:
    settings = resolve_settings(
        lake_env(
            tmp_path / "lake", {"DATALAKE_DEMO_DIR": str(tmp_path / "demo"), "DATALAKE_DEMO_CDR_ROWS": "500"}
        )
    )
    return settings, demo_engine(tmp_path / "demo", cdr_rows=500)


def test_primary_key_check_passes_on_silver_and_fails_on_duplicates_and_nulls(demo) -> None:
    settings, _ = demo
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    today = dt.datetime.now(settings.tz).date().isoformat()
    defs.resolve_job_def(BRONZE_JOB).execute_in_process(partition_key=today, instance=instance)
    silver = defs.resolve_job_def(SILVER_JOB).execute_in_process(instance=instance)
    evaluations = check_evaluations(silver)
    pk = {k: v for k, v in evaluations.items() if k[1] == "primary_key_unique_and_not_null"}
    assert len(pk) >= 14 and all(v.passed for v in pk.values())

    # Break silver/partner_current: a duplicated key and a NULL key.
    path = Path(settings.root("silver")) / "partner_current" / "partner_current.parquet"
    table = pq.read_table(path)
    broken = pa.concat_tables([table, table.slice(0, 1)])
    ids = broken.column("partner_id").to_pylist()
    ids[-1] = None
    broken = broken.set_column(
        broken.schema.get_field_index("partner_id"),
        "partner_id",
        pa.array(ids, table.schema.field("partner_id").type),
    )
    pq.write_table(broken.cast(broken.schema), path)
    key = dg.AssetCheckKey(dg.AssetKey(["silver", "partner_current"]), "primary_key_unique_and_not_null")
    result = run_checks(defs, {key}, instance)[("silver/partner_current", "primary_key_unique_and_not_null")]
    assert not result.passed
    assert result.metadata["null_keys"].value == 1

    pq.write_table(pa.concat_tables([table, table.slice(0, 2)]), path)
    result = run_checks(defs, {key}, instance)[("silver/partner_current", "primary_key_unique_and_not_null")]
    assert not result.passed and result.metadata["duplicate_keys"].value == 2


def test_revsci_primary_key_check_reads_every_partner(demo) -> None:
    settings, engine = demo
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    today = dt.datetime.now(settings.tz).date().isoformat()
    with engine.connect() as conn:  # the usage day with the newest CDRs (lake time zone: UTC)
        newest = conn.exec_driver_sql("SELECT max(started_at) FROM v3_billing.billing_cdr").scalar_one()
    day = str(newest)[:10]
    defs.resolve_job_def(BRONZE_JOB).execute_in_process(partition_key=today, instance=instance)
    defs.resolve_job_def(SILVER_JOB).execute_in_process(instance=instance)
    defs.resolve_job_def(SILVER_CDR_JOB).execute_in_process(partition_key=day, instance=instance)
    cdrs = pq.read_table(Path(settings.root("silver")) / "billing_cdr" / f"{day}.parquet")
    partners = sorted({str(p) for p in cdrs.column("partner_id").to_pylist()})[:2]
    assert len(partners) == 2
    instance.add_dynamic_partitions(PARTNERS.name or "", partners)
    for partner in partners:
        run = defs.resolve_job_def(REVSCI_JOB).execute_in_process(partition_key=partner, instance=instance)
        check = check_evaluations(run)[(USAGE_KEY.to_user_string(), "primary_key_unique_and_not_null")]
        rows = check.metadata["rows"].value
        assert check.passed and isinstance(rows, int) and rows > 0

    # One partner's file with a usage day and call type twice: the check over all partners fails.
    path = Path(settings.root("vanguard_wholesale")) / "billing_usage_aggregated" / f"{partners[1]}.parquet"
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), path)
    key = dg.AssetCheckKey(USAGE_KEY, "primary_key_unique_and_not_null")
    result = run_checks(defs, {key}, instance)[
        (USAGE_KEY.to_user_string(), "primary_key_unique_and_not_null")
    ]
    assert not result.passed and result.metadata["duplicate_keys"].value == 1


def test_blocking_primary_key_check_stops_downstream(tmp_path: Path) -> None:
    @dg.asset(
        key=["silver", "dup"], metadata={"datalake/primary_key": "id"}, io_manager_key="silver_io_manager"
    )
    def dup() -> pa.Table:
        return pa.table({"id": [1, 1, 2]})

    @dg.asset(key=["silver", "after"], deps=[dup.key])
    def after() -> None:
        raise AssertionError("must not run after a failed blocking check")

    check = primary_key_check(dup)
    assert check is not None
    settings = resolve_settings(lake_env(tmp_path / "lake", {"DATALAKE_DEMO_DIR": str(tmp_path / "demo")}))
    from datalake.definitions import build_resources

    resources = build_resources(settings)
    result = dg.materialize([dup, after, check], resources=resources, raise_on_error=False)
    (evaluation,) = check_evaluations(result).values()
    assert not evaluation.passed and evaluation.metadata["duplicate_keys"].value == 1
    assert dg.AssetKey(["silver", "after"]) not in {
        e.materialization.asset_key for e in result.get_asset_materialization_events()
    }


def test_window_reconciliation_detects_missing_rows(demo) -> None:
    settings, engine = demo
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    today = dt.datetime.now(settings.tz).date().isoformat()
    key = dg.AssetKey(["bronze", "payment"])
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={key})
    good = check_evaluations(job.execute_in_process(partition_key=today, instance=instance))
    assert good[("bronze/payment", "window_reconciles_with_source")].passed
    # A row that appears inside the already-extracted window (e.g. restored from a backup):
    # the source now has more rows there than bronze read.
    with engine.begin() as conn:
        row = (
            conn.exec_driver_sql("SELECT * FROM v3_billing.payment ORDER BY payment_id LIMIT 1")
            .mappings()
            .one()
        )
        new = dict(row, payment_id=10_000_000, reference="restored")
        conn.execute(sa.table("payment", *(sa.column(c) for c in new), schema="v3_billing").insert(), [new])
    check = dg.AssetCheckKey(key, "window_reconciles_with_source")
    bad = run_checks(defs, {check}, instance)[("bronze/payment", "window_reconciles_with_source")]
    assert not bad.passed
    source_rows, bronze_rows = (bad.metadata[k].value for k in ("source_rows_now", "bronze_rows"))
    assert isinstance(source_rows, int) and isinstance(bronze_rows, int)
    assert source_rows == bronze_rows + 1


@pytest.mark.parametrize(("policy", "passes"), [("capture", True), ("skip", False)])
def test_null_cursor_check_counts_rows_and_warns_when_skipped(
    demo, tmp_path: Path, policy: str, passes: bool
) -> None:
    settings, engine = demo
    document = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    for entry in document["tables"]:
        if entry["table"] == "customer_address":
            entry["null_cursor"] = policy
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump(document))
    settings = resolve_settings(
        lake_env(
            tmp_path / "lake",
            {"DATALAKE_DEMO_DIR": str(tmp_path / "demo"), "DATALAKE_REGISTRY": str(registry)},
        )
    )
    with engine.connect() as conn:
        nulls = conn.exec_driver_sql(
            "SELECT count(*) FROM v3_customer.customer_address WHERE updated_at IS NULL"
        ).scalar_one()
    assert nulls > 0
    defs = build_definitions(settings)
    check = dg.AssetCheckKey(dg.AssetKey(["bronze", "customer_address"]), "null_cursor_rows")
    result = run_checks(defs, {check}, dg.DagsterInstance.ephemeral())[
        ("bronze/customer_address", "null_cursor_rows")
    ]
    assert result.passed is passes
    assert result.metadata["null_cursor_rows"].value == nulls


def test_column_schema_change_check_flags_a_new_column(demo) -> None:
    settings, engine = demo
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    today = dt.datetime.now(settings.tz).date().isoformat()
    key = dg.AssetKey(["bronze", "dealer"])
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={key})
    job.execute_in_process(partition_key=today, instance=instance)
    job.execute_in_process(partition_key=today, instance=instance)
    checks = [
        c for c in defs.resolve_asset_graph().asset_check_keys if c.asset_key == key and "schema" in c.name
    ]
    assert checks
    same = run_checks(defs, set(checks), instance, partition=None)
    assert all(v.passed for v in same.values())
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE v3_partner.dealer ADD COLUMN tier VARCHAR(8)")
    job.execute_in_process(partition_key=today, instance=instance)
    changed = run_checks(defs, set(checks), instance, partition=None)
    assert changed and not any(v.passed for v in changed.values())


def test_duckdb_resource_settings_apply() -> None:
    con = DuckDBResource(memory_limit="512MB", threads=1).connect()
    limit = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    assert "488" in limit or "512" in limit or "MiB" in limit
    assert duckdb.__version__.startswith("2.")
    assert con.execute("SELECT current_setting('parquet_metadata_cache')").fetchall() == [(True,)]


def test_duckdb_metadata_cache_never_serves_a_replaced_files_footer(tmp_path: Path) -> None:
    """The connection caches Parquet footers; a file replaced at the same path (a retry of the
    same run rewrites its own bronze file) is read anew, columns and rows."""
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1, 2]}), path)
    con = DuckDBResource(memory_limit="512MB").connect()
    assert con.read_parquet(str(path)).fetchall() == [(1,), (2,)]
    time.sleep(0.01)  # a later modification time, even on coarse-grained clocks
    pq.write_table(pa.table({"id": [3, 4, 5], "note": ["a", "b", "c"]}), tmp_path / "t.new")
    os.replace(tmp_path / "t.new", path)
    relation = con.read_parquet(str(path))
    assert relation.columns == ["id", "note"]
    assert relation.fetchall() == [(3, "a"), (4, "b"), (5, "c")]


def test_bronze_freshness_check_passes_when_fresh_and_fails_when_stale(demo, tmp_path: Path) -> None:
    _, _engine = demo
    instance = dg.DagsterInstance.ephemeral()
    key = dg.AssetKey(["bronze", "dealer"])

    def defs_with(hours: str) -> dg.Definitions:
        return build_definitions(
            resolve_settings(
                lake_env(
                    tmp_path / "lake",
                    {"DATALAKE_DEMO_DIR": str(tmp_path / "demo"), "DATALAKE_BRONZE_FRESHNESS_HOURS": hours},
                )
            )
        )

    fresh_defs = defs_with("3")
    today = dt.datetime.now(dt.UTC).date().isoformat()
    fresh_defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={key}, asset_check_selection=set()
    ).execute_in_process(partition_key=today, instance=instance)
    (check,) = [
        c
        for c in fresh_defs.resolve_asset_graph().asset_check_keys
        if c.asset_key == key and "fresh" in c.name
    ]
    fresh = run_checks(fresh_defs, {check}, instance)
    assert fresh[(key.to_user_string(), check.name)].passed

    time.sleep(2.5)
    stale_defs = defs_with("0.0005")  # 1.8 s
    stale = run_checks(stale_defs, {check}, instance)
    assert not stale[(key.to_user_string(), check.name)].passed

    # A backfill of a past day lands: it commits no watermark and says nothing of today's data.
    yesterday = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    stale_defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={key}, asset_check_selection=set()
    ).execute_in_process(partition_key=yesterday, instance=instance)
    after_backfill = run_checks(stale_defs, {check}, instance)[(key.to_user_string(), check.name)]
    assert not after_backfill.passed
    assert after_backfill.metadata["datalake/partition"].value == today  # the incremental run's


def test_the_freshness_sensor_evaluates_a_check_when_its_state_changes(demo, tmp_path: Path) -> None:
    _, _engine = demo
    instance = dg.DagsterInstance.ephemeral()
    env = {"DATALAKE_DEMO_DIR": str(tmp_path / "demo"), "DATALAKE_BRONZE_FRESHNESS_HOURS": "0.0005"}  # 1.8 s
    defs = build_definitions(resolve_settings(lake_env(tmp_path / "lake", env)))
    sensor = next(s for s in defs.sensors or [] if s.name == "bronze_freshness_checks")
    key = dg.AssetKey(["bronze", "dealer"])
    check = dg.AssetCheckKey(key, "incremental_freshness")

    def due() -> set[dg.AssetCheckKey]:
        with dg.build_sensor_context(instance=instance, definitions=defs) as context:
            result = sensor(context)
        return set(result.asset_check_keys or []) if isinstance(result, dg.RunRequest) else set()

    assert check in due()  # never evaluated
    today = dt.datetime.now(dt.UTC).date().isoformat()
    # The table's run evaluates its checks too (fresh): nothing to do until it goes stale.
    defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={key}).execute_in_process(
        partition_key=today, instance=instance
    )
    assert check not in due()
    time.sleep(2.5)
    assert check in due()  # stale now, last evaluated fresh
    run_checks(defs, {check}, instance)
    assert check not in due()  # evaluated stale
