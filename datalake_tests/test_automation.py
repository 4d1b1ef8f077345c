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


def test_silver_follows_todays_bronze_during_a_bronze_backfill_of_past_days(tmp_path: Path) -> None:
    """A UI backfill of bronze days (queued for hours) must not hold silver back; today's incremental
    bronze run in progress does (its file is about to land)."""
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.storage.dagster_run import DagsterRunStatus

    from datalake.definitions import BRONZE_JOB

    settings = resolve_settings(lake_env(tmp_path / "lake", {"DATALAKE_PARTITION_START": "2026-01-01"}))
    defs = build_definitions(settings)
    graph = defs.resolve_asset_graph()
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(PARTNERS.name or "", ["1", "2"])
    today = dt.datetime.now(settings.tz).date().isoformat()
    silver_cdr, partner = dg.AssetKey(["silver", "billing_cdr"]), dg.AssetKey(["silver", "partner_current"])
    bronze = [k for k in graph.get_all_asset_keys() if k.path[0] == "bronze"]
    for key in graph.get_all_asset_keys():  # everything materialized once
        partitions: list[str | None] = [None]
        if key.path[0] == "bronze" or key == silver_cdr:
            partitions = [today]
        elif key == USAGE_KEY:
            partitions = ["1", "2"]
        for p in partitions:
            instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=p))
    cursor = dg.evaluate_automation_conditions(defs=defs, instance=instance).cursor

    def started_bronze_run(day: str, tags: dict[str, str]) -> str:
        job = defs.resolve_job_def(BRONZE_JOB)
        plan = create_execution_plan(job, tags={"dagster/partition": day})
        run = instance.create_run_for_job(
            job, execution_plan=plan, tags={"dagster/partition": day, **tags}, status=DagsterRunStatus.STARTED
        )
        return run.run_id

    def tick() -> dict[dg.AssetKey, list[str | None]]:
        nonlocal cursor
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        cursor = result.cursor
        return {k: sorted(result.get_requested_partitions(k), key=str) for k in (partner, silver_cdr)}

    backfill = started_bronze_run("2026-10-01", {"dagster/backfill": "b1"})
    for key in bronze:  # an earlier run of today lands while the backfill is in progress ...
        instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=today))
    todays = started_bronze_run(today, {})  # ... and the next incremental run has started
    assert tick() == {partner: [], silver_cdr: []}  # today's run is about to land: wait for it
    run = instance.get_run_by_id(todays)
    assert run is not None
    instance.report_run_failed(run)
    ticked = tick()  # the backfill of a past day (still in progress) holds nothing back
    assert ticked[partner] == [None] and today in ticked[silver_cdr]
    assert instance.get_run_by_id(backfill).status == DagsterRunStatus.STARTED  # type: ignore[union-attr]
