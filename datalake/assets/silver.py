"""Silver: DuckDB over the bronze files in place, deduplicated to current state and joined."""

from collections.abc import Sequence

import dagster as dg
import duckdb

from datalake.extract import EXTRACTED_AT_COLUMN, ROW_SEQ_COLUMN
from datalake.lake import DuckDBResource, ParquetPaths
from datalake.settings import SILVER
from datalake.specs import TableSpec


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def current_state(relation: duckdb.DuckDBPyRelation, spec: TableSpec) -> duckdb.DuckDBPyRelation:
    """Latest version per primary key: highest cursor, then latest extraction, then row order."""
    order: list[str] = []
    if spec.cursor is not None:
        order.append(f"{quote(spec.cursor.column)} DESC NULLS LAST")
    order += [f"{quote(EXTRACTED_AT_COLUMN)} DESC", f"{quote(ROW_SEQ_COLUMN)} DESC"]
    keys = ", ".join(quote(k) for k in spec.primary_key)
    ranked = relation.query(
        "versions",
        # identifiers only (validated by the registry, quoted here); no values
        f"SELECT * FROM versions QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {', '.join(order)}) = 1",  # noqa: S608
    )
    assert ranked is not None  # a SELECT always yields a relation
    return ranked


def bronze_in(table: str) -> dg.AssetIn:
    return dg.AssetIn(key=dg.AssetKey(["bronze", table]), input_manager_key="duckdb_path_input_manager")


def build_silver_assets(specs: Sequence[TableSpec]) -> list[dg.AssetsDefinition]:
    by_name = {s.asset_name: s for s in specs}
    needed = ("invoice", "invoice_status", "invoice_data")
    if any(name not in by_name for name in needed):
        return []  # a registry without the billing tables (e.g. a team's own source) has no invoice fact

    @dg.asset(
        key=dg.AssetKey(["silver", "fact_invoice"]),
        group_name=SILVER,
        io_manager_key="silver_io_manager",
        ins={name: bronze_in(name) for name in needed},
        kinds={"duckdb", "parquet"},
    )
    def fact_invoice(
        duckdb_resource: DuckDBResource,
        invoice: ParquetPaths,
        invoice_status: ParquetPaths,
        invoice_data: ParquetPaths,
    ) -> duckdb.DuckDBPyRelation:
        """Current state of every invoice with its status and data (invoice ⋈ invoice_status ⋈ invoice_data)."""
        con = duckdb_resource.connect()
        current_state(invoice.relation(con), by_name["invoice"]).create_view("inv")
        current_state(invoice_status.relation(con), by_name["invoice_status"]).create_view("st")
        current_state(invoice_data.relation(con), by_name["invoice_data"]).create_view("dat")
        return con.sql(
            """
            SELECT inv.invoice_id, inv.customer_id, inv.partner_id, inv.invoice_number,
                   inv.period_start, inv.period_end, inv.currency, inv.total_amount,
                   st.status, st.changed_at AS status_changed_at,
                   dat.line_count, dat.tax_amount, dat.discount_amount,
                   inv.created_at,
                   greatest(inv.updated_at, st.updated_at, dat.updated_at) AS updated_at
            FROM inv
            LEFT JOIN st ON st.invoice_id = inv.invoice_id
            LEFT JOIN dat ON dat.invoice_id = inv.invoice_id
            ORDER BY inv.invoice_id
            """
        )

    return [fact_invoice]
