"""Schedules and sensors: explicit default statuses, the partner sync, the schedule's partition."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from datalake.assets.revsci import PARTNERS, USAGE_KEY
from datalake.definitions import build_definitions
from datalake.demo.generator import demo_engine
from datalake.settings import resolve_settings
from datalake_tests.helpers import PROD_ENV, lake_env


@pytest.mark.parametrize(("env", "expected"), [({}, "STOPPED"), (PROD_ENV, "RUNNING")])
def test_default_statuses_are_explicit(env: dict[str, str], expected: str) -> None:
    defs = build_definitions(resolve_settings(env))
    schedules = {s.name: s.default_status.value for s in defs.schedules or []}
    sensors = {s.name: s.default_status.value for s in defs.sensors or []}
    assert schedules == {"bronze_incremental": expected, "bronze_delete_reconciliation": expected}
    assert sensors["datalake_automation"] == expected
    assert sensors["vanguard_partner_sync"] == "RUNNING"


def test_override_of_the_automation_default() -> None:
    defs = build_definitions(resolve_settings({**PROD_ENV, "DATALAKE_AUTOMATION": "stopped"}))
    assert {s.default_status.value for s in defs.schedules or []} == {"STOPPED"}


def test_silver_and_revsci_follow_bronze_by_automation_condition() -> None:
    graph = build_definitions(resolve_settings({})).resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        condition = graph.get(key).automation_condition
        if key.path[0] in ("silver", "revsci"):
            assert condition is not None, key
        else:
            assert condition is None, key  # bronze runs on the schedule, bounded by the pool


def test_schedule_targets_the_current_ingestion_date() -> None:
    settings = resolve_settings({"DATALAKE_TIMEZONE": "Europe/Berlin"})
    defs = build_definitions(settings)
    schedule = defs.resolve_schedule_def("bronze_incremental")
    # 23:30 UTC on 2026-03-28 is already the 29th in Berlin.
    when = dt.datetime(2026, 3, 28, 23, 30, tzinfo=dt.UTC)
    with dg.build_schedule_context(
        scheduled_execution_time=when, repository_def=defs.get_repository_def()
    ) as context:
        (request,) = schedule.evaluate_tick(context).run_requests or []
    assert request.partition_key == "2026-03-29"


def test_partner_sync_sensor_mirrors_the_mapping(tmp_path: Path) -> None:
    settings = resolve_settings(
        lake_env(
            tmp_path / "lake", {"DATALAKE_DEMO_DIR": str(tmp_path / "demo"), "DATALAKE_DEMO_CDR_ROWS": "500"}
        )
    )
    engine = demo_engine(tmp_path / "demo", cdr_rows=500)
    with engine.connect() as conn:
        partners = {
            str(p)
            for p in conn.exec_driver_sql(
                "SELECT DISTINCT partner_id FROM v3_partner.dealer_partner_mapping"
            ).scalars()
        }
    defs = build_definitions(settings)
    sensor = next(s for s in defs.sensors or [] if s.name == "vanguard_partner_sync")
    instance = dg.DagsterInstance.ephemeral()
    # Partners no longer mapped: one never materialized, one with a usage file; and a key typed
    # into the UI that is no partner id.
    instance.add_dynamic_partitions(PARTNERS.name or "", ["999999", "888888", "partner-7"])
    instance.report_runless_asset_event(dg.AssetMaterialization(USAGE_KEY, partition="888888"))

    def tick() -> dict[str, set[str]]:
        with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
            result = sensor(context)
        assert isinstance(result, dg.SensorResult)
        return {type(r).__name__: set(r.partition_keys) for r in result.dynamic_partitions_requests or []}

    requests = tick()
    assert requests["AddDynamicPartitionsRequest"] == partners
    # The partner with data keeps its partition (its file stays readable and rebuildable).
    assert requests["DeleteDynamicPartitionsRequest"] == {"999999", "partner-7"}

    # A mapping that reads empty (a source being reloaded) removes nothing.
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM v3_partner.dealer_partner_mapping")
    assert tick() == {}


@pytest.mark.parametrize(
    ("late_days", "days"), [("2", ["2026-10-24", "2026-10-25", "2026-10-26"]), ("0", ["2026-10-26"])]
)
def test_automation_rebuilds_late_days_and_does_not_wait_for_missing_bronze_days(
    late_days: str, days: list[str]
) -> None:
    """A bronze run after midnight brings CDRs of the days before: silver rebuilds them too (the
    2026-10-25 in Amsterdam has 25 hours). Bronze days never materialized (before the first
    deployment) do not hold silver or Rev-Sci back."""
    settings = resolve_settings(
        {
            "DATALAKE_TIMEZONE": "Europe/Amsterdam",
            "DATALAKE_PARTITION_START": "2026-10-01",
            "DATALAKE_SILVER_LATE_DAYS": late_days,
        }
    )
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(PARTNERS.name or "", ["1", "2"])
    silver_cdr, partner = dg.AssetKey(["silver", "billing_cdr"]), dg.AssetKey(["silver", "partner_current"])
    when = dt.datetime(2026, 10, 26, 0, 20, tzinfo=ZoneInfo("Europe/Amsterdam"))
    cursor = None

    def tick(minutes: int) -> dict[dg.AssetKey, list[str | None]]:
        nonlocal cursor
        result = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, evaluation_time=when + dt.timedelta(minutes=minutes), cursor=cursor
        )
        cursor = result.cursor
        return {key: sorted(result.get_requested_partitions(key)) for key in (silver_cdr, partner, USAGE_KEY)}  # type: ignore[type-var]

    assert tick(0) == {silver_cdr: [], partner: [], USAGE_KEY: []}
    # The 00:15 run of the new day; no bronze day before it exists.
    for table in ("billing_cdr", "partner"):
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=dg.AssetKey(["bronze", table]), partition="2026-10-26")
        )
    assert tick(1) == {silver_cdr: days, partner: [None], USAGE_KEY: []}
    # Silver has run (most of its days were never built): Rev-Sci follows, for every partner.
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=silver_cdr, partition="2026-10-25"))
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=partner))
    assert tick(2) == {silver_cdr: [], partner: [], USAGE_KEY: ["1", "2"]}
