"""Asset checks, declared beside the assets they guard.

- silver: primary key unique and non-null on every model that declares one — *blocking*, so a
  broken silver table never feeds the models and Rev-Sci built on it in the same run;
- bronze: the checked partition's window reconciled against the source's row count; NULL-cursor rows
  counted in the source; column-schema changes; freshness of the incremental tables: the age of
  the last run that committed a watermark (evaluated by the ``bronze_freshness_checks`` sensor).
"""

import datetime as dt
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dagster as dg
import sqlalchemy as sa

from datalake.extract import outside_every_window, utc_naive
from datalake.lake import DuckDBResource, ParquetPaths, quote_identifier
from datalake.source import V3SourceResource
from datalake.specs import CursorKind, Mode, NullCursorPolicy, TableSpec
from datalake.watermark import COMPLETE_UNTIL_KEY, committed_text, committing_record, decode_watermark

if TYPE_CHECKING:
    import duckdb

PRIMARY_KEY_METADATA = "datalake/primary_key"


def primary_key_check(asset: dg.AssetsDefinition) -> dg.AssetChecksDefinition | None:
    key = asset.key
    declared = asset.specs_by_key[key].metadata.get(PRIMARY_KEY_METADATA)
    if not declared:
        return None
    columns = [c.strip() for c in str(declared).split(",")]

    spec = dg.AssetCheckSpec(
        name="primary_key_unique_and_not_null",
        asset=key,
        description=f"({', '.join(columns)}) is unique and never NULL.",
        blocking=True,
    )

    # A multi-asset check, because it takes the checked asset as a *path* input (DuckDB reads
    # the files in place; all partitions for a partitioned asset), which `asset_check` can't.
    @dg.multi_asset_check(
        name=f"{'__'.join(key.path)}__primary_key",
        specs=[spec],
        ins={
            # An unpartitioned check maps to every partition of a partitioned asset.
            "data": dg.AssetIn(key=key, input_manager_key="duckdb_path_input_manager")
        },
    )
    def _check(duckdb_resource: DuckDBResource, data: ParquetPaths) -> dg.AssetCheckResult:
        con = duckdb_resource.connect()
        data.view(con, "t")
        keys = ", ".join(quote_identifier(c) for c in columns)
        nulls = " OR ".join(f"{quote_identifier(c)} IS NULL" for c in columns)
        row = _one(
            con,
            f"SELECT count(*), count(*) FILTER (WHERE {nulls}), "  # noqa: S608 - quoted identifiers only
            f"count(*) - count(DISTINCT ({keys})) FROM t",
        )
        rows, null_keys, duplicates = (int(v) for v in row)
        return dg.AssetCheckResult(
            asset_key=key,
            check_name=spec.name,
            passed=null_keys == 0 and duplicates == 0,
            metadata={"rows": rows, "null_keys": null_keys, "duplicate_keys": duplicates},
        )

    return _check


def _one(con: "duckdb.DuckDBPyConnection", sql: str) -> tuple[Any, ...]:
    (row,) = con.execute(sql).fetchall()
    return tuple(row)


def _source_table(spec: TableSpec, *columns: str) -> sa.TableClause:
    return sa.table(spec.table, *(sa.column(c) for c in columns), schema=spec.source_schema)


def bronze_checks(specs: Sequence[TableSpec], pool: str) -> list[dg.AssetChecksDefinition]:
    """The checks that query the source, each taking a slot in its concurrency ``pool``."""
    checks: list[dg.AssetChecksDefinition] = []
    for spec in specs:
        if spec.mode is not Mode.INCREMENTAL or spec.cursor is None:
            continue
        checks += [_reconciliation_check(spec, pool), _null_cursor_check(spec, pool)]
    return checks


# How many of a partition's newest materializations a check looks through for its own run's.
RECENT_RUNS = 10


def _reconciliation_check(spec: TableSpec, pool: str) -> dg.AssetChecksDefinition:
    key = dg.AssetKey(["bronze", spec.asset_name])
    cursor = spec.cursor
    assert cursor is not None

    @dg.asset_check(
        asset=key,
        name="window_reconciles_with_source",
        pool=pool,
        description="The checked window (this run's, else the checked partition's latest) holds at least "
        "the rows the source has in it now (rows updated since moved to a later window; none may be missing).",
    )
    def _check(context: dg.AssetCheckExecutionContext, v3_source: V3SourceResource) -> dg.AssetCheckResult:
        materialization = _checked_materialization(context, key)
        if materialization is None:
            return dg.AssetCheckResult(passed=True, metadata={"note": "not materialized yet"})
        meta = {k: v.value for k, v in materialization.metadata.items()}
        kind = str(meta.get("datalake/window_kind", ""))
        column = spec.window_column if kind == "backfill" else cursor.column
        bound_kind = CursorKind.TIMESTAMP if kind == "backfill" else cursor.kind
        lo, hi = (str(meta.get(f"datalake/window_{b}", "")) for b in ("lo", "hi"))
        window_column = sa.column(column or cursor.column)
        table = sa.table(spec.table, window_column, schema=spec.source_schema)
        # Over the cursor, NULL and zero-date rows lie outside every window: bronze does not count
        # them as window rows (a first run's `cursor < hi` matches a zero date), so neither does this.
        where = [] if kind == "backfill" else [sa.not_(outside_every_window(window_column, cursor.kind))]
        if lo:
            where.append(window_column >= utc_naive(decode_watermark(lo, bound_kind)))
        if hi:
            where.append(window_column < utc_naive(decode_watermark(hi, bound_kind)))
        with v3_source.engine().connect() as conn:
            source_rows = int(
                conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
            )
        bronze_rows = _window_rows(meta)
        return dg.AssetCheckResult(
            passed=bronze_rows >= source_rows,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "partition": materialization.partition or "",
                "window": f"[{lo or '-inf'}, {hi or '+inf'})",
                "bronze_rows": bronze_rows,
                "source_rows_now": source_rows,
            },
        )

    return _check


def _checked_materialization(
    context: dg.AssetCheckExecutionContext, key: dg.AssetKey
) -> dg.AssetMaterialization | None:
    """The materialization this check evaluates.

    In the asset's own run, the one that run wrote (for the run's partition); otherwise (the
    checks run alone, a re-execution) the latest of the partition being checked. Not the asset's
    latest of *any* partition: a backfill of another day, or a concurrent run, may have landed since.
    """
    instance = context.instance
    if not context.has_partition_key:
        event = instance.get_latest_materialization_event(key)
        return event.asset_materialization if event else None
    # The newest few of the partition: this run's is among them unless that many runs of the same
    # partition landed after it.
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[context.partition_key]), limit=RECENT_RUNS
    ).records
    own = [r for r in records if r.run_id == context.run.run_id]
    chosen = own[0] if own else (records[0] if records else None)
    return chosen.asset_materialization if chosen else None


def _window_rows(meta: Mapping[str, Any]) -> int:
    """The rows bronze read from the window's bounds (what the source's count is held against)."""
    if "datalake/window_rows" in meta:
        return int(str(meta["datalake/window_rows"]))

    # Written before that entry existed: ``dagster/row_count`` also holds the NULL-cursor rows
    # (re-read every run, outside the window's bounds) and a reconciliation's delete tombstones.
    def count(name: str) -> int:
        return int(str(meta.get(name) or 0))

    return count("dagster/row_count") - count("datalake/null_cursor_rows") - count("datalake/deletes_found")


def _null_cursor_check(spec: TableSpec, pool: str) -> dg.AssetChecksDefinition:
    key = dg.AssetKey(["bronze", spec.asset_name])
    cursor = spec.cursor
    assert cursor is not None

    @dg.asset_check(
        asset=key,
        name="null_cursor_rows",
        pool=pool,
        description=f"Counts source rows whose {cursor.column} is NULL (or a zero date); with null_cursor: skip they are "
        "not extracted, so any is a warning.",
    )
    def _check(v3_source: V3SourceResource) -> dg.AssetCheckResult:
        table = _source_table(spec, cursor.column)
        with v3_source.engine().connect() as conn:
            count = int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(table)
                    .where(outside_every_window(table.c[cursor.column], cursor.kind))
                ).scalar_one()
            )
        captured = spec.null_cursor is NullCursorPolicy.CAPTURE
        return dg.AssetCheckResult(
            passed=captured or count == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"null_cursor_rows": count, "policy": spec.null_cursor.value},
        )

    return _check


def build_checks(
    specs: Sequence[TableSpec],
    bronze: Sequence[dg.AssetsDefinition],
    downstream: Sequence[dg.AssetsDefinition],
    freshness: dt.timedelta,
    source_pool: str,
) -> tuple[list[dg.AssetChecksDefinition], list[dg.SensorDefinition]]:
    """Every check of the location, and the sensor that evaluates bronze freshness."""
    checks: list[dg.AssetChecksDefinition] = [
        c for a in downstream if (c := primary_key_check(a)) is not None
    ]
    checks += bronze_checks(specs, source_pool)
    checks += dg.build_column_schema_change_checks(assets=list(bronze))
    incremental = [dg.AssetKey(["bronze", s.asset_name]) for s in specs if s.mode is Mode.INCREMENTAL]
    fresh = [_freshness_check(key, freshness) for key in incremental]
    return [*checks, *fresh], [_freshness_sensor(incremental, fresh, freshness)]


FRESHNESS_CHECK = "incremental_freshness"
# A planned evaluation younger than this is taken to be on its way (its run queued or running).
_PLANNED_GRACE_SECONDS = 3600


def freshness_result(
    instance: dg.DagsterInstance, key: dg.AssetKey, freshness: dt.timedelta
) -> dg.AssetCheckResult:
    """Fresh when the lake holds the table's rows up to less than ``freshness`` ago: the committed
    window's ``datalake/complete_until`` (older materializations: when the run landed).

    Not when the last run landed: a forgotten open transaction on the source caps every window's
    ``hi`` at its start, and runs kept landing on time with nothing new. Nor Dagster's last-update
    check: it takes the newest materialization of any partition, so a backfill of a past day (which
    commits no watermark, and says nothing of today's data) made a stale table pass.
    """
    record = committing_record(instance, key)
    hours = f"{freshness.total_seconds() / 3600:g} h"
    if record is None:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"No incremental run has landed yet (expected within {hours}).",
        )
    materialization = record.asset_materialization
    entry = materialization.metadata.get(COMPLETE_UNTIL_KEY) if materialization else None
    landed_age = time.time() - record.timestamp
    if entry is not None and isinstance(entry.value, str) and entry.value:
        complete_until = dt.datetime.fromisoformat(entry.value).timestamp()
        age = time.time() - complete_until
        description = (
            f"The lake holds this table's rows up to {age / 3600:.1f} h ago (its last incremental run "
            f"landed {landed_age / 3600:.1f} h ago; expected within {hours})."
        )
    else:
        age = landed_age
        description = f"The last incremental run landed {age / 3600:.1f} h ago (expected within {hours})."
    passed = age <= freshness.total_seconds()
    metadata: dict[str, Any] = {
        "dagster/last_updated_time": dg.MetadataValue.timestamp(record.timestamp),
        "datalake/partition": record.partition_key or "",
        "datalake/watermark": committed_text(record),
        **({COMPLETE_UNTIL_KEY: entry.value} if entry is not None else {}),
    }
    if not passed:
        metadata["dagster/overdue_seconds"] = round(age - freshness.total_seconds())
    return dg.AssetCheckResult(
        passed=passed, severity=dg.AssetCheckSeverity.WARN, description=description, metadata=metadata
    )


def _freshness_check(key: dg.AssetKey, freshness: dt.timedelta) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=key,
        name=FRESHNESS_CHECK,
        description=f"The lake holds the table's rows up to less than {freshness.total_seconds() / 3600:g} h "
        "ago (the last committed window's datalake/complete_until); backfills of past days do not count.",
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        return freshness_result(context.instance, key, freshness)

    return _check


def _freshness_sensor(
    keys: Sequence[dg.AssetKey], checks: Sequence[dg.AssetChecksDefinition], freshness: dt.timedelta
) -> dg.SensorDefinition:
    check_keys = [dg.AssetCheckKey(key, FRESHNESS_CHECK) for key in keys]

    @dg.sensor(
        name="bronze_freshness_checks",
        minimum_interval_seconds=300,
        asset_selection=dg.AssetSelection.checks(*checks),
        # Explicit: Dagster would leave it stopped, and freshness would never be evaluated.
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Evaluates a bronze table's incremental_freshness check when its state changes "
        "(a fresh table turned stale, or a stale one fresh) or it was never evaluated.",
    )
    def bronze_freshness_checks(context: dg.SensorEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        due = [k for k in check_keys if _freshness_due(context.instance, k, freshness)]
        if not due:
            return dg.SkipReason("every bronze freshness check is up to date")
        return dg.RunRequest(asset_check_keys=due)

    return bronze_freshness_checks


def _freshness_due(
    instance: dg.DagsterInstance, check_key: dg.AssetCheckKey, freshness: dt.timedelta
) -> bool:
    """Whether the check's last evaluation no longer says what it would say now."""
    history = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=1)
    last = history[0] if history else None
    if last is None:
        return True
    status = last.status.value  # PLANNED, SUCCEEDED (passed), FAILED (did not pass)
    if status == "PLANNED":
        return time.time() - last.create_timestamp > _PLANNED_GRACE_SECONDS
    return (status == "SUCCEEDED") != freshness_result(instance, check_key.asset_key, freshness).passed
