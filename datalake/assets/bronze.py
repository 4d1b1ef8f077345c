"""Bronze: one daily-partitioned asset per registry entry (partition = ingestion date).

Which window a run reads (DESIGN §3.3):
- the current ingestion date, not part of a backfill → incremental [watermark, source now - lag);
  the watermark is committed by the materialization;
- any other date, or any run of a backfill → the stateless window [D, D+1) in the lake's time
  zone over the table's date column; the watermark is neither read nor moved;
- run config (launchpad) can force a full refresh, an explicit window, or a starting watermark.
"""

import datetime as dt
from collections.abc import Callable
from typing import Any, Literal

import dagster as dg

from datalake.extract import DATE_GUARDS_KEY, Extraction, NotRetryable, Window, WindowKind, extract
from datalake.settings import Settings
from datalake.source import V3SourceResource
from datalake.specs import CursorKind, Mode, TableSpec
from datalake.watermark import WatermarkResource, decode_watermark

BACKFILL_TAG = "dagster/backfill"
# Set by the bronze schedules: the ingestion date of the tick. Such a run is that date's incremental
# run whenever it executes: a tick at 23:15 whose run waits for the V3 pool until after midnight
# (or a step retried then) still reads its incremental window, instead of taking its partition for a
# past day and re-reading that whole day statelessly without moving the watermark.
SCHEDULED_DAY_TAG = "datalake/scheduled_day"


def retry_policy(settings: Settings) -> dg.RetryPolicy:
    """Source faults (2006 gone away, 2013 lost connection, 1205 lock wait...) are retried with
    back-off. A failed attempt commits no watermark, so a retry reads the same window again."""
    return dg.RetryPolicy(
        max_retries=settings.bronze_max_retries,
        delay=settings.bronze_retry_delay_seconds,
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS,
    )


class BronzeRunConfig(dg.Config):
    """Operator controls, offered in the launchpad."""

    mode: Literal["auto", "incremental", "full_refresh", "window"] = "auto"
    # mode=window: explicit [window_start, window_end) over the cursor (ISO timestamp or integer);
    # stateless like a backfill.
    window_start: str | None = None
    window_end: str | None = None
    # Start this incremental run from this watermark instead of the committed one (set/reset).
    set_watermark: str | None = None
    # After the window, reconcile primary keys with the source and write tombstones for keys
    # deleted there (keys only, streamed). The bronze_delete_reconciliation schedule sets it.
    reconcile_deletes: bool = False


def daily_partitions(settings: Settings) -> dg.DailyPartitionsDefinition:
    # end_offset=1: today's partition exists, so the incremental run of the day has a key.
    return dg.DailyPartitionsDefinition(
        start_date=settings.partition_start.isoformat(), timezone=settings.timezone, end_offset=1
    )


def _day_bounds(partition_key: str, settings: Settings) -> tuple[dt.datetime, dt.datetime]:
    day = dt.date.fromisoformat(partition_key)
    start = dt.datetime.combine(day, dt.time(), tzinfo=settings.tz)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=settings.tz)
    return start.astimezone(dt.UTC), end.astimezone(dt.UTC)


class RunConfigError(ValueError):
    """Run config that cannot mean what the operator asked: names the field; never retried."""


def _bound(field: str, text: str | None, kind: CursorKind, settings: Settings) -> Any:
    """An operator's bound: an integer, or an ISO timestamp (no offset: the lake's time zone,
    the zone the partitions' days are in)."""
    if text is None:
        return None
    try:
        return decode_watermark(text, kind, naive_tz=settings.tz)
    except ValueError:
        expected = (
            "an integer"
            if kind is CursorKind.INTEGER
            else f"an ISO 8601 timestamp such as 2024-05-01T00:00:00 ({settings.timezone} unless it has an offset)"
        )
        raise RunConfigError(f"{field}: {text!r} is not {expected}") from None


def _validate(config: BronzeRunConfig, mode: str, *, is_backfill: bool) -> None:
    """Combinations that would do something other than asked are refused, naming the field."""
    bounds = config.window_start is not None or config.window_end is not None
    if bounds and mode != "window":
        raise RunConfigError(f"window_start/window_end: only with mode 'window' (mode is {config.mode!r})")
    if config.set_watermark is not None and mode != "incremental":
        raise RunConfigError(
            "set_watermark: only for an incremental run (today's partition outside a backfill, "
            f"or mode 'incremental'); this run reads a {mode} window"
        )
    if is_backfill and mode in ("incremental", "full_refresh"):
        raise RunConfigError(
            f"mode: {mode!r} commits a watermark, and a backfill's runs read their days statelessly; "
            "use 'auto' or 'window' in a backfill, or launch the run on its own"
        )


def plan_window(
    spec: TableSpec,
    config: BronzeRunConfig,
    partition_key: str,
    *,
    is_backfill: bool,
    settings: Settings,
    committed: Callable[[], object],
    today: dt.date,
) -> Window:
    """The window this run reads. ``committed`` is called only when the watermark is needed."""
    if spec.mode is Mode.SNAPSHOT:
        asked = [f for f in ("window_start", "window_end", "set_watermark") if getattr(config, f) is not None]
        if asked or config.mode in ("incremental", "window"):
            raise RunConfigError(f"{(asked or ['mode'])[0]}: a snapshot table is read whole, every run")
        return Window(WindowKind.SNAPSHOT)
    assert spec.cursor is not None
    kind = spec.cursor.kind
    mode = config.mode
    if mode == "auto":
        explicit = config.window_start is not None or config.window_end is not None
        past = is_backfill or partition_key != today.isoformat()
        mode = "window" if explicit or past else "incremental"
    _validate(config, mode, is_backfill=is_backfill)
    if mode == "full_refresh":
        return Window(WindowKind.FULL_REFRESH, column=spec.cursor.column)
    if mode == "incremental":
        if config.set_watermark is None:
            return Window(WindowKind.INCREMENTAL, column=spec.cursor.column, lo=committed())
        lo = _bound("set_watermark", config.set_watermark, kind, settings)
        return Window(WindowKind.INCREMENTAL, column=spec.cursor.column, lo=lo, lo_from_operator=True)
    if config.window_start is not None or config.window_end is not None:
        lo = _bound("window_start", config.window_start, kind, settings)
        hi = _bound("window_end", config.window_end, kind, settings)
        if lo is not None and hi is not None and not lo < hi:
            raise RunConfigError(
                f"window_end: {config.window_end!r} is not after window_start {config.window_start!r}"
            )
        return Window(WindowKind.EXPLICIT, column=spec.cursor.column, lo=lo, hi=hi)
    lo, hi = _day_bounds(partition_key, settings)
    return Window(WindowKind.BACKFILL, column=spec.window_column, lo=lo, hi=hi)


def _today(context: dg.AssetExecutionContext, settings: Settings) -> dt.date:
    """The ingestion date whose run this is incremental for: a scheduled run's tick date, else today.

    The tick date counts until the day after it ends: a re-execution of a scheduled run (which
    keeps its tags) days later is the stateless repair of that day again, not an incremental run
    filed under it.
    """
    today = dt.datetime.now(settings.tz).date()
    scheduled = context.run.tags.get(SCHEDULED_DAY_TAG)
    if scheduled and dt.timedelta(0) <= today - dt.date.fromisoformat(scheduled) <= dt.timedelta(days=1):
        return dt.date.fromisoformat(scheduled)
    return today


def _needed_date_guards(instance: dg.DagsterInstance, key: dg.AssetKey) -> bool:
    """Whether the table's latest materialization met zero dates (then this run starts guarded)."""
    event = instance.get_latest_materialization_event(key)
    materialization = event.asset_materialization if event else None
    entry = materialization.metadata.get(DATE_GUARDS_KEY) if materialization else None
    return bool(entry is not None and entry.value)


def build_bronze_asset(spec: TableSpec, settings: Settings) -> dg.AssetsDefinition:
    batch_size = spec.batch_size or settings.batch_size
    batch_bytes = spec.batch_bytes or settings.batch_bytes
    key = dg.AssetKey(["bronze", spec.asset_name])

    @dg.asset(
        key=key,
        group_name=spec.group,
        description=spec.description
        or f"{spec.qualified_name}, extracted {spec.mode.value} into append-only Parquet.",
        partitions_def=daily_partitions(settings),
        io_manager_key="bronze_io_manager",
        pool=settings.v3_pool,
        retry_policy=retry_policy(settings),
        kinds={"mysql", "parquet"},
        metadata={
            "datalake/source_table": spec.qualified_name,
            "datalake/primary_key": ", ".join(spec.primary_key),
            "datalake/mode": spec.mode.value,
            "datalake/cursor": f"{spec.cursor.column} ({spec.cursor.kind.value})" if spec.cursor else "",
            "datalake/batch_size": batch_size,
            "datalake/batch_bytes": batch_bytes,
            "datalake/max_streams": spec.streams or settings.extract_streams,
        },
        tags={"datalake/source": "v3"},
    )
    def _bronze(
        context: dg.AssetExecutionContext,
        config: BronzeRunConfig,
        v3_source: V3SourceResource,
        watermarks: WatermarkResource,
    ) -> Extraction:
        assert spec.cursor is not None or spec.mode is Mode.SNAPSHOT
        try:
            window = plan_window(
                spec,
                config,
                context.partition_key,
                is_backfill=BACKFILL_TAG in context.run.tags,
                settings=settings,
                committed=lambda: watermarks.committed(
                    context.instance,
                    key,
                    spec.cursor.kind,  # type: ignore[union-attr]
                    table=spec.qualified_name,
                    source=v3_source.describe(),
                    column=spec.cursor.column,  # type: ignore[union-attr]
                ),
                today=_today(context, settings),
            )
        except RunConfigError as exc:
            raise dg.Failure(f"{spec.qualified_name}: run config {exc}", allow_retries=False) from None
        except NotRetryable as exc:  # a watermark this run cannot start from: a retry reads the same
            raise dg.Failure(str(exc), allow_retries=False) from None
        context.log.info(
            f"{spec.qualified_name}: {window.kind.value} window lo={window.lo!s} hi={window.hi or 'source now'} "
            f"from {v3_source.describe()}"
        )
        try:
            return extract(
                v3_source.engine(),
                spec,
                window,
                run_id=context.run.run_id,
                batch_size=batch_size,
                batch_bytes=batch_bytes,
                lag=dt.timedelta(seconds=settings.extract_lag_seconds),
                log=context.log.info,
                warn=context.log.warning,
                source=v3_source.describe(),
                arrow_url=v3_source.arrow_url if v3_source.reads_arrow else None,
                reconcile_deletes=config.reconcile_deletes and spec.mode is Mode.INCREMENTAL,
                date_guards=_needed_date_guards(context.instance, key),
                streams=spec.streams or settings.extract_streams,
                stream_min_rows=settings.extract_stream_min_rows,
            )
        except NotRetryable as exc:  # the registry disagrees with the source: a retry reads the same
            raise dg.Failure(str(exc), allow_retries=False) from None

    return _bronze


def build_bronze_assets(specs: tuple[TableSpec, ...], settings: Settings) -> list[dg.AssetsDefinition]:
    return [build_bronze_asset(spec, settings) for spec in specs]
