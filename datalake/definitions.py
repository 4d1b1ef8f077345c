"""The code location: assets from the registry, IO managers by role, resources, jobs, schedules.

``defs`` is built lazily by ``@dg.definitions`` when Dagster loads the location, from the
settings the environment resolver produces. Tests call ``build_definitions(settings)``
directly with their own settings; nothing is decided at import time.
"""

from __future__ import annotations

import datetime as dt

import dagster as dg

from datalake.assets.bronze import SCHEDULED_DAY_TAG, build_bronze_assets
from datalake.assets.revsci import build_partner_sync_sensor, build_revsci_assets
from datalake.assets.silver import build_silver_assets
from datalake.checks import build_checks
from datalake.io_managers import (
    BronzeIOManager,
    DuckDBPathInputManager,
    ParquetIOManager,
    check_storage_names,
)
from datalake.lake import DuckDBResource
from datalake.settings import (
    BRONZE,
    MYSQL_PASSWORD_VAR,
    SILVER,
    VANGUARD_WHOLESALE,
    Settings,
    resolve_settings,
)
from datalake.source import V3SourceResource
from datalake.specs import Mode, load_registry
from datalake.storage import parse_root
from datalake.watermark import WatermarkResource

BRONZE_JOB = "bronze_job"
SILVER_JOB = "silver_job"
SILVER_CDR_JOB = "silver_billing_cdr_job"
REVSCI_JOB = "revsci_job"


def source_resource(settings: Settings) -> V3SourceResource:
    source = settings.source
    if source.mysql is None:
        return V3SourceResource(
            kind="demo",
            demo_dir=str(source.demo_dir),
            demo_seed=source.demo_seed,
            demo_cdr_rows=source.demo_cdr_rows,
        )
    mysql = source.mysql
    return V3SourceResource(
        kind="mysql",
        host=mysql.host,
        port=mysql.port,
        user=mysql.user,
        password=dg.EnvVar(MYSQL_PASSWORD_VAR) if mysql.has_password else None,  # type: ignore[arg-type]
        ssl_ca=mysql.ssl_ca,
        ssl_cert=mysql.ssl_cert,
        ssl_key=mysql.ssl_key,
        ssl_mode=mysql.ssl_mode,
        reader=mysql.reader,
    )


def build_resources(settings: Settings) -> dict[str, object]:
    """Role key -> implementation, with the storage root of the environment for each group.

    Moving a group between local disk, NFS and ADLS is its ``DATALAKE_ROOT_<GROUP>`` alone: the
    roots below (and the path input manager's view of them) all come from ``settings.root``.
    """
    roots = {
        "bronze_io_manager": settings.root(BRONZE),
        "silver_io_manager": settings.root(SILVER),
        "revsci_io_manager": settings.root(VANGUARD_WHOLESALE),
    }
    azure = None
    extra: dict[str, object] = {}
    if any(parse_root(root).is_azure for root in roots.values()):
        from datalake.azure import azure_resource  # the Azure SDK only where a root needs it

        azure = extra["azure"] = azure_resource(settings)
    return {
        "v3_source": source_resource(settings),
        "watermarks": WatermarkResource(),
        "duckdb_resource": DuckDBResource(
            memory_limit=settings.duckdb.memory_limit,
            threads=settings.duckdb.threads,
            remote_threads=settings.duckdb.remote_threads,
            temp_directory=settings.duckdb.temp_directory,
        ),
        **extra,
        "bronze_io_manager": BronzeIOManager(root=roots["bronze_io_manager"], azure=azure),
        "silver_io_manager": ParquetIOManager(
            root=roots["silver_io_manager"], azure=azure, row_group_bytes=settings.batch_bytes
        ),
        "revsci_io_manager": ParquetIOManager(
            root=roots["revsci_io_manager"], azure=azure, row_group_bytes=settings.batch_bytes
        ),
        # Reads each upstream where its own IO manager (by role) wrote it.
        "duckdb_path_input_manager": DuckDBPathInputManager(roots=roots, azure=azure),
    }


def build_definitions(settings: Settings) -> dg.Definitions:
    specs = load_registry(settings.registry_path)
    bronze = build_bronze_assets(specs, settings)
    downstream = [*build_silver_assets(specs, settings), *build_revsci_assets(specs, settings)]
    check_storage_names([*bronze, *downstream])
    checks, check_sensors = build_checks(
        specs, bronze, downstream, dt.timedelta(hours=settings.bronze_freshness_hours), settings.v3_pool
    )
    bronze_job = dg.define_asset_job(
        BRONZE_JOB,
        # Every bronze asset by key: a registry entry may name its own asset group.
        selection=dg.AssetSelection.assets(*(a.key for a in bronze)),
        description="Extract every bronze table for one ingestion date (today = incremental).",
        # Runs that read the V3 source: the run coordinator limits them by this tag.
        tags={"datalake/source": "v3"},
    )
    # One job per partitioning: a job's assets share one partitions definition.
    partitioned = {a.key for a in downstream if a.partitions_def is not None}
    silver_job = dg.define_asset_job(
        SILVER_JOB,
        selection=dg.AssetSelection.assets(
            *(a.key for a in downstream if a.key.path[0] == SILVER and a.key not in partitioned)
        ),
        description="Rebuild the current-state and conformed silver models from the bronze lake.",
    )
    silver_cdr_job = dg.define_asset_job(
        SILVER_CDR_JOB,
        selection=dg.AssetSelection.assets(dg.AssetKey(["silver", "billing_cdr"])),
        description="Cleaned CDRs for usage days (a range runs as one query: single-run backfill).",
    )
    revsci_job = dg.define_asset_job(
        REVSCI_JOB,
        selection=dg.AssetSelection.groups(VANGUARD_WHOLESALE),
        description="Rev-Sci usage for Vanguard Wholesale partners (one partition per partner).",
    )
    jobs = [bronze_job, silver_job]
    keys = {a.key for a in downstream}
    if dg.AssetKey(["silver", "billing_cdr"]) in keys:
        jobs.append(silver_cdr_job)
    if any(a.group_names_by_key.get(a.key) == VANGUARD_WHOLESALE for a in downstream):
        jobs.append(revsci_job)

    running = (
        dg.DefaultScheduleStatus.RUNNING if settings.automation_running else dg.DefaultScheduleStatus.STOPPED
    )

    @dg.schedule(
        name="bronze_incremental",
        job=bronze_job,
        cron_schedule=settings.bronze_cron,
        execution_timezone=settings.timezone,
        default_status=running,
        description="Incremental bronze run for the current ingestion date (DATALAKE_BRONZE_CRON).",
    )
    def bronze_incremental(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        day = context.scheduled_execution_time.astimezone(settings.tz).date().isoformat()
        return dg.RunRequest(partition_key=day, tags={SCHEDULED_DAY_TAG: day})

    reconcile_config = {
        "ops": {
            f"bronze__{spec.asset_name}": {"config": {"reconcile_deletes": True}}
            for spec in specs
            if spec.mode is Mode.INCREMENTAL
        }
    }

    @dg.schedule(
        name="bronze_delete_reconciliation",
        job=bronze_job,
        cron_schedule=settings.deletes_cron,
        execution_timezone=settings.timezone,
        default_status=running,
        description="Incremental run plus primary-key reconciliation: tombstones for rows deleted "
        "in the source (DATALAKE_DELETES_CRON). On demand: run config reconcile_deletes: true.",
    )
    def bronze_delete_reconciliation(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        day = context.scheduled_execution_time.astimezone(settings.tz).date().isoformat()
        return dg.RunRequest(partition_key=day, run_config=reconcile_config, tags={SCHEDULED_DAY_TAG: day})

    sensors: list[dg.SensorDefinition] = [
        # Silver and Rev-Sci follow bronze by their automation conditions; this sensor evaluates
        # them. Dagster's default automation sensor starts stopped, so the status is explicit here.
        dg.AutomationConditionSensorDefinition(
            "datalake_automation",
            target=dg.AssetSelection.groups(SILVER, VANGUARD_WHOLESALE),
            default_status=dg.DefaultSensorStatus.RUNNING
            if settings.automation_running
            else dg.DefaultSensorStatus.STOPPED,
            minimum_interval_seconds=60,
        ),
        *check_sensors,
    ]
    partner_sync = build_partner_sync_sensor(specs)
    if partner_sync is not None:
        sensors.append(partner_sync)
    return dg.Definitions(
        assets=[*bronze, *downstream],
        asset_checks=checks,
        jobs=jobs,
        schedules=[bronze_incremental, bronze_delete_reconciliation],
        sensors=sensors,
        resources=build_resources(settings),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(resolve_settings())
