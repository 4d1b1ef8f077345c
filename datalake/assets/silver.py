"""Silver: DuckDB over the bronze files in place, deduplicated to current state and joined.

- ``silver/<table>_current`` for every incremental registry table: the latest version of each
  primary key (cursor, then extraction order), without keys the delete reconciliation
  tombstoned. Generated from the registry.
- conformed models: ``fact_invoice``, ``dim_customer``, ``dealer_partner_mapping`` (current state,
  joined) and ``billing_cdr`` (cleaned events, daily partitions by usage day, single-run backfills).

Inputs arrive as ``ParquetPaths`` through the DuckDB path input manager, so DuckDB pushes
projections and filters down to the files; assets return DuckDB relations that the Parquet IO
manager streams into the lake.
"""

import datetime as dt
from collections.abc import Callable, Sequence

import dagster as dg

from datalake.deletes import current_versions_sql
from datalake.extract import DELETED_COLUMN, LINEAGE_COLUMNS
from datalake.lake import PARTITION_COLUMN_KEY, DuckDBResource, ParquetPaths, Relation
from datalake.lake import quote_identifier as quote
from datalake.settings import SILVER, Settings
from datalake.specs import Mode, TableSpec

# Silver follows bronze without hand work: each asset runs when its upstream changed. That is
# Dagster's eager() with two of its waits narrowed. "No upstream partition missing": every bronze
# day since the partition start is an upstream partition, and days before the first deployment (or
# one the schedule missed) never appear, so eager() would never run silver; a day without files is
# an empty input here (DESIGN.md §3.5), not a reason to wait. "No upstream partition in progress":
# a UI backfill of 90 bronze days would hold every silver and Rev-Sci asset back until its last run
# (a stuck run, for ever); bronze files appear atomically, so only the upstream's latest day (the
# incremental run about to land) is waited for.
_LATEST_UPSTREAM_DAY_IN_PROGRESS = dg.AutomationCondition.any_deps_match(
    dg.AutomationCondition.in_progress() & dg.AutomationCondition.in_latest_time_window()
).with_label("upstream's latest day in progress")
FOLLOW_UPSTREAM = (
    dg.AutomationCondition.eager()
    .without(~dg.AutomationCondition.any_deps_missing())
    .without(~dg.AutomationCondition.any_deps_in_progress())
    & ~_LATEST_UPSTREAM_DAY_IN_PROGRESS
).with_label("follow upstream")


def follow_upstream_days(late_days: int) -> dg.AutomationCondition:
    """FOLLOW_UPSTREAM for a daily asset, over today and the ``late_days`` before it.

    eager() considers only the latest day, but a bronze run after midnight brings CDRs that
    started the day before (the call ended, or was extracted, after midnight): without the
    earlier days those CDRs would never reach their usage day, nor Rev-Sci.
    """
    # The look-back counts hours back from the end of today and takes the days that start
    # within it: half a day of slack, so a 25-hour DST day does not push the earliest one out.
    lookback = dt.timedelta(days=late_days + 1, hours=12)
    return FOLLOW_UPSTREAM.replace(
        dg.AutomationCondition.in_latest_time_window(), dg.AutomationCondition.in_latest_time_window(lookback)
    ).with_label(f"follow upstream, today and {late_days} day(s) before")


def lake_today(settings: Settings) -> dt.date:
    """Today in the lake's time zone (DuckDB's ``current_date`` is the process's, UTC in the image)."""
    return dt.datetime.now(settings.tz).date()


def current_state(relation: Relation, spec: TableSpec) -> Relation:
    """Latest version per primary key (highest cursor, then latest extraction, then row order) of the
    keys live after their latest delete tombstone (see ``current_versions_sql``); lineage dropped."""
    columns = relation.columns
    tombstones = DELETED_COLUMN in columns
    deleted = f"coalesce({quote(DELETED_COLUMN)}, false)" if tombstones else "false"
    keep = ", ".join(quote(c) for c in columns if c not in LINEAGE_COLUMNS)
    # identifiers only (validated by the registry, quoted here); no values
    versions = relation.query("bronze", f"SELECT *, {deleted} AS __deleted FROM bronze")  # noqa: S608
    assert versions is not None  # a SELECT always yields a relation
    ranked = versions.query("versions", current_versions_sql("versions", spec, keep, tombstones=tombstones))
    assert ranked is not None
    return ranked


def path_in(key: Sequence[str], partition_mapping: dg.PartitionMapping | None = None) -> dg.AssetIn:
    return dg.AssetIn(
        key=dg.AssetKey(list(key)),
        input_manager_key="duckdb_path_input_manager",
        partition_mapping=partition_mapping,
    )


def bronze_in(table: str, partition_mapping: dg.PartitionMapping | None = None) -> dg.AssetIn:
    return path_in(["bronze", table], partition_mapping)


def current_key(table: str) -> dg.AssetKey:
    return dg.AssetKey(["silver", f"{table}_current"])


def build_current_state_asset(spec: TableSpec) -> dg.AssetsDefinition:
    @dg.asset(
        key=current_key(spec.asset_name),
        group_name=SILVER,
        description=f"Current state of {spec.qualified_name}: latest version per "
        f"{', '.join(spec.primary_key)}, deleted keys removed.",
        io_manager_key="silver_io_manager",
        ins={"bronze": bronze_in(spec.asset_name)},
        kinds={"duckdb", "parquet"},
        automation_condition=FOLLOW_UPSTREAM,
        metadata={"datalake/primary_key": ", ".join(spec.primary_key)},
    )
    def _current(duckdb_resource: DuckDBResource, bronze: ParquetPaths) -> Relation:
        keyless = bronze.files_without(spec.primary_key)
        if keyless:
            # Their rows would all share one NULL key: one of them "current", the rest gone.
            raise dg.Failure(
                f"{spec.qualified_name}: {len(keyless)} bronze file(s) have no column "
                f"{', '.join(spec.primary_key)} of the primary key (the first: {keyless[0]}), written "
                "before the key column was renamed or added. Move the table's bronze files away and "
                "run it with mode: full_refresh, which reads every row again under the new key",
                allow_retries=False,
            )
        con = duckdb_resource.connect()
        return current_state(bronze.relation(con), spec)

    return _current


def _model(name: str, inputs: Sequence[str], primary_key: str) -> Callable[..., dg.AssetsDefinition]:
    """The decorator of a conformed silver model over current-state tables."""
    return dg.asset(
        key=dg.AssetKey(["silver", name]),
        group_name=SILVER,
        io_manager_key="silver_io_manager",
        ins={n: path_in(current_key(n).path) for n in inputs},
        kinds={"duckdb", "parquet"},
        automation_condition=FOLLOW_UPSTREAM,
        metadata={"datalake/primary_key": primary_key},
    )


def _conformed(specs: dict[str, TableSpec], settings: Settings) -> list[dg.AssetsDefinition]:
    assets: list[dg.AssetsDefinition] = []
    have = set(specs)

    if {"invoice", "invoice_status", "invoice_data"} <= have:

        @_model("fact_invoice", ("invoice", "invoice_status", "invoice_data"), "invoice_id")
        def fact_invoice(
            duckdb_resource: DuckDBResource,
            invoice: ParquetPaths,
            invoice_status: ParquetPaths,
            invoice_data: ParquetPaths,
        ) -> Relation:
            """Current state of every invoice with its status and data (invoice ⋈ invoice_status ⋈ invoice_data)."""
            con = duckdb_resource.connect()
            invoice.view(con, "inv")
            invoice_status.view(con, "invoice_status")
            invoice_data.view(con, "invoice_data")
            # The source allows one status and one data row per invoice (UNIQUE(invoice_id)), but
            # their current state is keyed by the row id: a delete + re-insert under a new id leaves
            # both rows current until the nightly delete reconciliation. Join the newest one only.
            return con.sql(
                """
                SELECT inv.invoice_id, inv.customer_id, inv.partner_id, inv.invoice_number,
                       inv.period_start, inv.period_end, inv.currency, inv.total_amount,
                       st.status, st.changed_at AS status_changed_at,
                       dat.line_count, dat.tax_amount, dat.discount_amount,
                       inv.created_at,
                       greatest(inv.updated_at, st.updated_at, dat.updated_at) AS updated_at
                FROM inv
                LEFT JOIN (SELECT * FROM invoice_status
                           QUALIFY row_number() OVER (PARTITION BY invoice_id
                                                      ORDER BY updated_at DESC, invoice_status_id DESC) = 1) st
                       ON st.invoice_id = inv.invoice_id
                LEFT JOIN (SELECT * FROM invoice_data
                           QUALIFY row_number() OVER (PARTITION BY invoice_id
                                                      ORDER BY updated_at DESC, invoice_data_id DESC) = 1) dat
                       ON dat.invoice_id = inv.invoice_id
                ORDER BY inv.invoice_id
                """
            )

        assets.append(fact_invoice)

    if {"dealer_partner_mapping", "dealer", "partner"} <= have:

        @_model("dealer_partner_mapping", ("dealer_partner_mapping", "dealer", "partner"), "mapping_id")
        def dealer_partner_mapping(
            duckdb_resource: DuckDBResource,
            dealer_partner_mapping: ParquetPaths,
            dealer: ParquetPaths,
            partner: ParquetPaths,
        ) -> Relation:
            """Which partner each dealer belongs to, over time, with both names; `is_current` marks today's mapping."""
            con = duckdb_resource.connect()
            dealer_partner_mapping.view(con, "m")
            dealer.view(con, "d")
            partner.view(con, "p")
            return con.sql(
                """
                SELECT m.mapping_id, m.dealer_id, d.name AS dealer_name, d.region AS dealer_region,
                       m.partner_id, p.name AS partner_name, p.is_wholesale,
                       m.valid_from, m.valid_to, m.commission_rate,
                       (m.valid_from <= $today AND (m.valid_to IS NULL OR m.valid_to > $today)) AS is_current,
                       m.updated_at
                FROM m LEFT JOIN d ON d.dealer_id = m.dealer_id LEFT JOIN p ON p.partner_id = m.partner_id
                ORDER BY m.mapping_id
                """,
                params={"today": lake_today(settings)},
            )

        assets.append(dealer_partner_mapping)

    dim_inputs = ("customer", "customer_address", "dealer", "dealer_partner_mapping", "partner")
    if set(dim_inputs) <= have:

        @_model("dim_customer", dim_inputs, "customer_id")
        def dim_customer(
            duckdb_resource: DuckDBResource,
            customer: ParquetPaths,
            customer_address: ParquetPaths,
            dealer: ParquetPaths,
            dealer_partner_mapping: ParquetPaths,
            partner: ParquetPaths,
        ) -> Relation:
            """One row per current customer with dealer, current partner and primary billing address."""
            con = duckdb_resource.connect()
            customer.view(con, "c")
            customer_address.view(con, "customer_address")
            dealer.view(con, "d")
            dealer_partner_mapping.view(con, "dealer_partner_mapping")
            partner.view(con, "p")
            return con.sql(
                """
                SELECT c.customer_id, c.first_name, c.last_name, c.company_name, c.email,
                       c.country_code, c.status, c.is_business,
                       c.dealer_id, d.name AS dealer_name,
                       m.partner_id, p.name AS partner_name,
                       a.city AS billing_city, a.postal_code AS billing_postal_code,
                       c.created_at, c.updated_at
                FROM c
                LEFT JOIN d ON d.dealer_id = c.dealer_id
                LEFT JOIN (SELECT * FROM dealer_partner_mapping
                           WHERE valid_from <= $today AND (valid_to IS NULL OR valid_to > $today)
                           QUALIFY row_number() OVER (PARTITION BY dealer_id ORDER BY valid_from DESC) = 1) m
                       ON m.dealer_id = c.dealer_id
                LEFT JOIN p ON p.partner_id = m.partner_id
                LEFT JOIN (SELECT * FROM customer_address WHERE address_type = 'billing'
                           QUALIFY row_number() OVER (PARTITION BY customer_id
                                                      ORDER BY is_primary DESC, address_id) = 1) a
                       ON a.customer_id = c.customer_id
                ORDER BY c.customer_id
                """,
                params={"today": lake_today(settings)},
            )

        assets.append(dim_customer)

    if "billing_cdr" in have:
        cdr_spec = specs["billing_cdr"]

        @dg.asset(
            key=dg.AssetKey(["silver", "billing_cdr"]),
            group_name=SILVER,
            io_manager_key="silver_io_manager",
            # Every bronze file may hold a day's CDRs (late arrivals, re-reads): read them all,
            # filtered by DuckDB at the files to the days this run builds.
            ins={"bronze": bronze_in("billing_cdr", dg.AllPartitionMapping())},
            partitions_def=usage_day_partitions(settings),
            # One range query builds any number of days; the IO manager splits it by usage_date.
            backfill_policy=dg.BackfillPolicy.single_run(),
            kinds={"duckdb", "parquet"},
            automation_condition=follow_upstream_days(settings.silver_late_days),
            metadata={PARTITION_COLUMN_KEY: "usage_date", "datalake/primary_key": "cdr_id"},
        )
        def billing_cdr(
            context: dg.AssetExecutionContext, duckdb_resource: DuckDBResource, bronze: ParquetPaths
        ) -> Relation:
            """Cleaned CDRs, one per cdr_id, partitioned by usage day (started_at in the lake's time zone)."""
            window = context.partition_time_window
            con = duckdb_resource.connect()
            bronze.view(con, "bronze_cdr")
            days = {"start": window.start, "end": window.end}
            # Only the keys with a version in these days: DuckDB cannot push the filter on
            # started_at below the dedup's window (by cdr_id), so every run ranked the whole CDR
            # history. A key whose current version falls in these days has that version here; its
            # other versions and its tombstones come along by key.
            in_days = con.sql(
                "SELECT * FROM bronze_cdr WHERE cdr_id IN "
                "(SELECT cdr_id FROM bronze_cdr WHERE started_at >= $start AND started_at < $end)",
                params=days,
            )
            current_state(in_days, cdr_spec).create_view("cdr")
            return con.sql(
                """
                SELECT cdr_id, subscription_id, customer_id, partner_id, call_type,
                       started_at, CAST(timezone($tz, started_at) AS DATE) AS usage_date,
                       duration_seconds, bytes_used, cost, origin, destination, is_roaming, created_at
                FROM cdr
                WHERE started_at >= $start AND started_at < $end
                ORDER BY usage_date, cdr_id
                """,
                params={"tz": settings.timezone, **days},
            )

        assets.append(billing_cdr)
    return assets


def usage_day_partitions(settings: Settings) -> dg.DailyPartitionsDefinition:
    # Today is a partition too: the current day's usage so far.
    return dg.DailyPartitionsDefinition(
        start_date=settings.partition_start.isoformat(), timezone=settings.timezone, end_offset=1
    )


def build_silver_assets(specs: Sequence[TableSpec], settings: Settings) -> list[dg.AssetsDefinition]:
    incremental = [s for s in specs if s.mode is Mode.INCREMENTAL]
    by_name = {s.asset_name: s for s in incremental}
    return [*(build_current_state_asset(s) for s in incremental), *_conformed(by_name, settings)]
