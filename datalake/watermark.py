"""Watermarks live in the bronze asset's materialization metadata.

The committed watermark of a table is the ``datalake/watermark`` entry of its asset's
latest materialization that carries one. The bronze IO manager writes that entry only
after the Parquet file is durably in the lake, and Dagster records the materialization
only after the IO manager returns — so the commit rides on the materialization event and
a crash anywhere before it leaves the previous watermark in force (the window is read
again: at-least-once, never a gap). Backfills and explicit windows carry no entry, so they
neither read nor move it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import dagster as dg

from datalake.specs import CursorKind

WATERMARK_KEY = "datalake/watermark"
# The instant up to which the table is complete in the lake once that watermark is committed.
COMPLETE_UNTIL_KEY = "datalake/complete_until"
_PAGE = 100


def encode_watermark(value: Any) -> str:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat(timespec="microseconds")
    return str(int(value))


def decode_watermark(text: str, kind: CursorKind, *, naive_tz: dt.tzinfo = dt.UTC) -> Any:
    """A watermark or bound; a timestamp without an offset is in ``naive_tz`` (stored ones have one)."""
    if kind is CursorKind.INTEGER:
        return int(text)
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=naive_tz)


def committing_record(instance: dg.DagsterInstance, asset_key: dg.AssetKey) -> dg.EventLogRecord | None:
    """The asset's newest materialization that committed a watermark (an incremental run or a full
    refresh; backfills and explicit windows commit none), or None."""
    cursor: str | None = None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key), limit=_PAGE, cursor=cursor, ascending=False
        )
        for record in page.records:
            materialization = record.asset_materialization
            entry = materialization.metadata.get(WATERMARK_KEY) if materialization else None
            if entry is not None and isinstance(entry.value, str):
                return record
        if not page.has_more:
            return None
        cursor = page.cursor


def committed_text(record: dg.EventLogRecord) -> str:
    materialization = record.asset_materialization
    assert materialization is not None
    return str(materialization.metadata[WATERMARK_KEY].value)


SOURCE_KEY = "datalake/source"
# The cursor column a committed watermark is a value of (recorded with it since this was added).
WATERMARK_COLUMN_KEY = "datalake/watermark_column"


def source_kind(described: str) -> str:
    """``mysql`` or ``demo``, from a source's description (``V3SourceResource.describe``)."""
    return "mysql" if described.startswith("mysql://") else "demo"


class WatermarkResource(dg.ConfigurableResource):
    """Reads committed watermarks from the instance's event log (PostgreSQL in production)."""

    def committed(
        self,
        instance: dg.DagsterInstance,
        asset_key: dg.AssetKey,
        kind: CursorKind,
        *,
        table: str,
        source: str,
        column: str | None = None,
    ) -> Any:
        """The committed watermark, refused (naming ``table``) when it cannot be this run's start:
        written reading another kind of source (the demo's, then MySQL's: its rows below the
        demo's watermark were never read), a value of another cursor ``column`` than the
        registry's now, or not a value of the registry's cursor kind."""
        from datalake.extract import NotRetryable

        record = committing_record(instance, asset_key)
        if record is None:
            return None
        text = committed_text(record)
        materialization = record.asset_materialization
        stored = materialization.metadata.get(SOURCE_KEY) if materialization else None
        reset = "run it with mode: full_refresh (or set_watermark) to start over"
        if stored is not None and source_kind(str(stored.value)) != source_kind(source):
            raise NotRetryable(
                f"{table}: the committed watermark {text} was read from {stored.value}, this run reads "
                f"{source}; {reset}, or give this source a lake and Dagster instance of its own "
                "(make clean-lake, or other DATALAKE_ROOT_* and DAGSTER_HOME)"
            )
        try:
            value = decode_watermark(text, kind)
        except ValueError:
            raise NotRetryable(
                f"{table}: the committed watermark {text!r} is not a value of a {kind.value} cursor "
                f"(the registry's cursor changed?); {reset}"
            ) from None
        stored_column = materialization.metadata.get(WATERMARK_COLUMN_KEY) if materialization else None
        if column is not None and stored_column is not None and str(stored_column.value) != column:
            # Same kind, another column: rows whose new cursor lies below the watermark while the
            # old one did not (an update to an old row, for created_at → updated_at) were never read.
            raise NotRetryable(
                f"{table}: the committed watermark {text} is a value of cursor column "
                f"{stored_column.value!r}, and the registry's cursor is now {column!r}: rows whose "
                f"{column} lies below it were not all read; {reset}"
            )
        return value
