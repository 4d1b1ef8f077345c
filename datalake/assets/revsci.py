"""Rev-Sci (Vanguard Wholesale): partner-level billing usage under the vanguard_wholesale root.

Partitioned by partner (dynamic partitions ``vanguard_partner``, kept in sync with the
dealer→partner mapping by the ``vanguard_partner_sync`` sensor), so the lake holds one file
per partner (``<root>/billing_usage_aggregated/<partner_id>.parquet``) — the slice Rev-Sci
analysts read — and a UI backfill over N partners is one run: one DuckDB query with the
partner filter pushed down to the silver CDR files, split by partner on write.

Why not date x partner: usage is re-aggregated from the current state of the CDRs, and a
partner's whole history in one file is what its consumers read; days would multiply the files
(partners x days) for no reader.
"""

from collections.abc import Sequence

import dagster as dg
import sqlalchemy as sa

from datalake.assets.silver import FOLLOW_UPSTREAM, current_key, path_in
from datalake.checks import PRIMARY_KEY_METADATA
from datalake.lake import PARTITION_COLUMN_KEY, DuckDBResource, ParquetPaths, Relation
from datalake.settings import VANGUARD_WHOLESALE, Settings
from datalake.source import V3SourceResource
from datalake.specs import TableSpec

PARTNERS = dg.DynamicPartitionsDefinition(name="vanguard_partner")
USAGE_KEY = dg.AssetKey(["revsci", "billing_usage_aggregated"])


def build_revsci_assets(specs: Sequence[TableSpec], settings: Settings) -> list[dg.AssetsDefinition]:
    names = {s.asset_name for s in specs}
    if not {"billing_cdr", "partner"} <= names:
        return []

    @dg.asset(
        key=USAGE_KEY,
        group_name=VANGUARD_WHOLESALE,
        io_manager_key="revsci_io_manager",
        ins={
            "billing_cdr": path_in(["silver", "billing_cdr"], dg.AllPartitionMapping()),
            "partner": path_in(current_key("partner").path),
        },
        partitions_def=PARTNERS,
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"duckdb", "parquet"},
        automation_condition=FOLLOW_UPSTREAM,
        metadata={
            PARTITION_COLUMN_KEY: "partner_id",
            "datalake/usage_date_time_zone": settings.timezone,
            PRIMARY_KEY_METADATA: "partner_id, usage_date, call_type",  # its blocking check reads every partner
        },
    )
    def billing_usage_aggregated(
        context: dg.AssetExecutionContext,
        duckdb_resource: DuckDBResource,
        billing_cdr: ParquetPaths,
        partner: ParquetPaths,
    ) -> Relation:
        """Billing usage per partner, usage day and call type (CDR count, seconds, bytes, cost)."""
        partner_ids = [int(key) for key in context.partition_keys]
        con = duckdb_resource.connect()
        billing_cdr.view(con, "cdr")
        partner.view(con, "p")
        return con.sql(
            """
            SELECT cdr.partner_id, p.name AS partner_name, p.is_wholesale,
                   cdr.usage_date, cdr.call_type,
                   count(*) AS cdr_count,
                   -- DuckDB sums integers as HUGEINT (DECIMAL(38,0) in the file); a partner's day
                   -- fits a BIGINT, and a sum that did not would fail the run, not wrap.
                   CAST(sum(cdr.duration_seconds) AS BIGINT) AS duration_seconds,
                   CAST(sum(cdr.bytes_used) AS BIGINT) AS bytes_used,
                   sum(cdr.cost) AS cost
            FROM cdr LEFT JOIN p ON p.partner_id = cdr.partner_id
            WHERE cdr.partner_id IN (SELECT unnest($partners::UBIGINT[]))
            GROUP BY ALL
            ORDER BY cdr.partner_id, cdr.usage_date, cdr.call_type
            """,
            params={"partners": partner_ids},
        )

    return [billing_usage_aggregated]


def mapped_partners(v3_source: V3SourceResource, mapping: TableSpec) -> set[str]:
    """Partition keys the mapping calls for: every partner a dealer is (or was) mapped to."""
    table = sa.table(mapping.table, sa.column("partner_id"), schema=mapping.source_schema)
    with v3_source.engine().connect() as conn:
        return {str(p) for p in conn.execute(sa.select(table.c.partner_id).distinct()).scalars()}


def _partner_order(key: str) -> tuple[bool, int, str]:
    return (not key.isdigit(), int(key) if key.isdigit() else 0, key)


def partner_changes(instance: dg.DagsterInstance, wanted: set[str]) -> tuple[list[str], list[str]]:
    """(partners to add, partition keys to remove) to follow the mapping.

    A partner no longer mapped keeps its partition once it has been materialized: its usage file
    stays readable and its CDRs billable, and removing the partition would leave the file behind,
    never refreshed. Removed are only keys that never held data, and keys that are no partner id
    (one typed into the UI). An empty mapping (a source being reloaded) removes nothing.
    """
    existing = set(instance.get_dynamic_partitions(PARTNERS.name or ""))
    added = sorted(wanted - existing, key=_partner_order)
    if not wanted:
        return added, []
    with_data = instance.get_materialized_partitions(USAGE_KEY)
    removed = [k for k in existing - wanted if not k.isdigit() or k not in with_data]
    return added, sorted(removed, key=_partner_order)


def build_partner_sync_sensor(specs: Sequence[TableSpec]) -> dg.SensorDefinition | None:
    mapping = next((s for s in specs if s.asset_name == "dealer_partner_mapping"), None)
    if mapping is None:
        return None

    @dg.sensor(
        name="vanguard_partner_sync",
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Adds a `vanguard_partner` partition for each partner of the dealer→partner mapping; "
        "removes partitions of unmapped partners that never held data.",
    )
    def vanguard_partner_sync(
        context: dg.SensorEvaluationContext, v3_source: V3SourceResource
    ) -> dg.SensorResult:
        added, removed = partner_changes(context.instance, mapped_partners(v3_source, mapping))
        requests = []
        if added:
            requests.append(PARTNERS.build_add_request(added))
        if removed:
            requests.append(PARTNERS.build_delete_request(removed))
        return dg.SensorResult(
            dynamic_partitions_requests=requests,
            skip_reason=None if requests else "partners in sync with the mapping",
        )

    return vanguard_partner_sync


def sync_partners(
    instance: dg.DagsterInstance, v3_source: V3SourceResource, specs: Sequence[TableSpec]
) -> list[str]:
    """What the sensor does, at once (the demo and tests): returns the partner keys."""
    mapping = next(s for s in specs if s.asset_name == "dealer_partner_mapping")
    added, removed = partner_changes(instance, mapped_partners(v3_source, mapping))
    if added:
        instance.add_dynamic_partitions(PARTNERS.name or "", added)
    for key in removed:
        instance.delete_dynamic_partition(PARTNERS.name or "", key)
    return list(instance.get_dynamic_partitions(PARTNERS.name or ""))
