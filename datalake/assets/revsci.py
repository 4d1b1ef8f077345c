"""Rev-Sci (Vanguard Wholesale): partner-level billing usage, stored under the vanguard_wholesale root."""

from collections.abc import Sequence

import dagster as dg
import duckdb

from datalake.assets.silver import bronze_in, current_state
from datalake.lake import DuckDBResource, ParquetPaths
from datalake.settings import VANGUARD_WHOLESALE, Settings
from datalake.specs import TableSpec


def build_revsci_assets(specs: Sequence[TableSpec], settings: Settings) -> list[dg.AssetsDefinition]:
    by_name = {s.asset_name: s for s in specs}
    if "billing_cdr" not in by_name or "partner" not in by_name:
        return []

    @dg.asset(
        key=dg.AssetKey(["revsci", "billing_usage_aggregated"]),
        group_name=VANGUARD_WHOLESALE,
        io_manager_key="revsci_io_manager",
        ins={"billing_cdr": bronze_in("billing_cdr"), "partner": bronze_in("partner")},
        kinds={"duckdb", "parquet"},
        metadata={"datalake/usage_date_time_zone": settings.timezone},
    )
    def billing_usage_aggregated(
        duckdb_resource: DuckDBResource, billing_cdr: ParquetPaths, partner: ParquetPaths
    ) -> duckdb.DuckDBPyRelation:
        """Billing usage per partner, usage day (lake time zone) and call type."""
        con = duckdb_resource.connect()
        # CDRs are immutable but bronze is at-least-once: one row per cdr_id before summing.
        current_state(billing_cdr.relation(con), by_name["billing_cdr"]).create_view("cdr")
        current_state(partner.relation(con), by_name["partner"]).create_view("p")
        return con.sql(
            """
            SELECT cdr.partner_id, p.name AS partner_name, p.is_wholesale,
                   CAST(timezone($tz, cdr.started_at) AS DATE) AS usage_date,
                   cdr.call_type,
                   count(*) AS cdr_count,
                   sum(cdr.duration_seconds) AS duration_seconds,
                   sum(cdr.bytes_used) AS bytes_used,
                   sum(cdr.cost) AS cost
            FROM cdr LEFT JOIN p ON p.partner_id = cdr.partner_id
            GROUP BY ALL
            ORDER BY cdr.partner_id, usage_date, cdr.call_type
            """,
            params={"tz": settings.timezone},
        )

    return [billing_usage_aggregated]
