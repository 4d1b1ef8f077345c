"""Command line for the demo: ``python -m datalake.cli demo``.

Runs the main flow on the embedded demo source (or the configured MySQL) against the
Dagster instance in ``DAGSTER_HOME`` (so ``make dev`` shows the runs afterwards):
seed the source, backfill the last N bronze partitions, run today's incremental run,
then silver and Rev-Sci; print what was materialized. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
import time
from collections.abc import Iterator, Sequence

import dagster as dg

from datalake.assets.revsci import sync_partners
from datalake.definitions import (
    BRONZE_JOB,
    REVSCI_JOB,
    SILVER_CDR_JOB,
    SILVER_JOB,
    build_definitions,
    source_resource,
)
from datalake.settings import Settings, resolve_settings
from datalake.source import V3SourceResource
from datalake.specs import load_registry

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def _instance() -> dg.DagsterInstance:
    if os.environ.get("DAGSTER_HOME"):
        os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
        return dg.DagsterInstance.get()
    return dg.DagsterInstance.ephemeral()


def _materializations(result: dg.ExecuteInProcessResult) -> list[tuple[str, str, int | None, str]]:
    rows: list[tuple[str, str, int | None, str]] = []
    for event in result.get_asset_materialization_events():
        materialization = event.materialization
        metadata = materialization.metadata
        count = metadata.get("dagster/row_count")
        uri = metadata.get("dagster/uri")
        rows.append(
            (
                materialization.asset_key.to_user_string(),
                materialization.partition or "-",
                int(count.value) if count is not None and isinstance(count.value, int) else None,
                str(uri.value) if uri is not None else "",
            )
        )
    return rows


@contextlib.contextmanager
def _source(settings: Settings) -> Iterator[V3SourceResource]:
    """The source resource outside a run, its EnvVar-held secrets resolved as a run would."""
    with dg.build_resources({"v3_source": source_resource(settings)}) as resources:
        yield resources.v3_source


def run_demo(
    settings: Settings, days: int, instance: dg.DagsterInstance
) -> list[tuple[str, str, int | None, str]]:
    defs = build_definitions(settings)
    started = time.monotonic()
    with _source(settings) as source:
        print(f"source: {source.describe()}", flush=True)
        source.engine().dispose()  # creates and seeds the demo source on first use
    print(f"  ready in {time.monotonic() - started:.1f}s", flush=True)

    today = dt.datetime.now(settings.tz).date()
    bronze = defs.resolve_job_def(BRONZE_JOB)
    materialized: list[tuple[str, str, int | None, str]] = []
    # Not before the first partition (DATALAKE_PARTITION_START may be recent).
    for day in (today - dt.timedelta(days=offset) for offset in range(days, 0, -1)):
        if day < settings.partition_start:
            continue
        key = day.isoformat()
        print(f"bronze backfill partition {key} ...", flush=True)
        result = bronze.execute_in_process(
            partition_key=key, instance=instance, tags={"datalake/trigger": "demo-backfill"}
        )
        materialized += _materializations(result)
    print(f"bronze incremental run, partition {today.isoformat()} ...", flush=True)
    result = bronze.execute_in_process(partition_key=today.isoformat(), instance=instance)
    materialized += _materializations(result)
    materialized += run_downstream(
        defs,
        settings,
        instance,
        first_day=max(today - dt.timedelta(days=31), settings.partition_start),
        last_day=today,
    )
    print(f"done in {time.monotonic() - started:.1f}s", flush=True)
    return materialized


def run_downstream(
    defs: dg.Definitions,
    settings: Settings,
    instance: dg.DagsterInstance,
    *,
    first_day: dt.date,
    last_day: dt.date,
) -> list[tuple[str, str, int | None, str]]:
    """Silver, the silver CDR days [first_day, last_day] as one run, then Rev-Sci for every partner as one run."""
    print("silver ...", flush=True)
    rows = _materializations(defs.resolve_job_def(SILVER_JOB).execute_in_process(instance=instance))
    print(f"silver billing_cdr {first_day}..{last_day} (one run) ...", flush=True)
    result = defs.resolve_job_def(SILVER_CDR_JOB).execute_in_process(
        instance=instance, tags={RANGE_START: first_day.isoformat(), RANGE_END: last_day.isoformat()}
    )
    rows += _materializations(result)
    with _source(settings) as source:
        partners = sync_partners(instance, source, load_registry(settings.registry_path))
    print(f"Rev-Sci for {len(partners)} partners (one run) ...", flush=True)
    result = defs.resolve_job_def(REVSCI_JOB).execute_in_process(
        instance=instance, tags={RANGE_START: partners[0], RANGE_END: partners[-1]}
    )
    return rows + _materializations(result)


def print_summary(rows: Sequence[tuple[str, str, int | None, str]], settings: Settings) -> None:
    """One line per asset: partitions written, rows, runs, and where the files are."""
    by_asset: dict[str, list[tuple[str, int, str]]] = {}
    for asset, partition, count, uri in rows:
        by_asset.setdefault(asset, []).append((partition, count or 0, uri))
    print("\nMaterialized:")
    width = max((len(a) for a in by_asset), default=10)
    print(f"  {'asset':<{width}}  {'partitions':<24}  {'runs':>4}  {'rows':>9}  location")
    for asset in sorted(by_asset):
        entries = by_asset[asset]
        keys = sorted({p for p, _, _ in entries})
        span = keys[0] if len(keys) == 1 else f"{keys[0]}..{keys[-1]} ({len(keys)})"
        total = sum(c for _, c, _ in entries)
        uri = entries[-1][2]
        # Several partitions: the asset's folder, not one of its files.
        location = uri.split("/ingestion_date=")[0] if "/ingestion_date=" in uri else uri
        if len(keys) > 1 and location.endswith(".parquet"):
            location = location.rsplit("/", 1)[0] + "/"
        print(f"  {asset:<{width}}  {span:<24}  {len(entries):>4}  {total:>9,}  {location}")
    print("\nStorage roots:")
    for group, root in settings.storage_roots.items():
        print(f"  {group:<20} {root}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datalake.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="seed the demo source and run bronze (backfill + incremental), silver, Rev-Sci"
    )
    demo.add_argument("--days", type=int, default=7, help="bronze partitions to backfill before today")
    args = parser.parse_args(argv)
    settings = resolve_settings()
    if args.command == "demo":
        rows = run_demo(settings, args.days, _instance())
        print_summary(rows, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
