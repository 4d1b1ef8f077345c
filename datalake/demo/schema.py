"""Table definitions of the demo "V3" OLTP source.

One :class:`sqlalchemy.MetaData` describes the three MySQL databases (``v3_partner``,
``v3_customer``, ``v3_billing``).  The same metadata creates

* the real thing on MySQL / MariaDB (``mysql+pymysql``): InnoDB, utf8mb4, DECIMAL, BIGINT
  UNSIGNED, TINYINT(1), DATETIME(6), TIMESTAMP(6), ENUM, JSON -- the types the extractor
  has to cope with in production, and
* an embedded SQLite copy for demos and tests, where every MySQL database is a separate
  SQLite file ATTACHed under the schema name, so ``Table(..., schema="v3_billing")`` and
  schema-qualified SQL work unchanged.

All timestamps are naive UTC.  MySQL ``TIMESTAMP`` columns are converted through the
*session* time zone, so every MySQL connection that reads or writes this data must run
with ``time_zone = '+00:00'`` (:func:`mysql_engine` sets it on connect; the generator
also sets it on the connections it uses).
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.types import UserDefinedType

SCHEMAS: tuple[str, ...] = ("v3_partner", "v3_customer", "v3_billing")

# Index/constraint names are spelled out by a convention so that MySQL and SQLite get the
# same, predictable names (SQLite index names must be unique per attached database).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# Table options of every MySQL table.  The collation is spelled out because server defaults
# differ (MariaDB 10.x: utf8mb4_general_ci, MySQL 8: utf8mb4_0900_ai_ci, MariaDB 11.x: uca1400).
MYSQL_TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_unicode_ci",
}


class SqliteDecimal(UserDefinedType[Decimal]):
    """Exact DECIMAL(p, s) emulation for SQLite.

    SQLite has no decimal type and SQLAlchemy's ``Numeric`` on SQLite goes through float (and
    warns about it).  Values are bound as their exact decimal *text*; the column has NUMERIC
    affinity, so SQLite stores them as INTEGER/REAL only when that conversion is lossless
    (15 significant digits) and keeps the text otherwise.  Reading back converts through
    ``repr``/``str`` (shortest round-trip form) and quantizes to the column scale, so the
    Decimal read back equals the Decimal written -- the same value MySQL returns.
    """

    cache_ok = True

    def __init__(self, precision: int, scale: int) -> None:
        self.precision = precision
        self.scale = scale
        self._quantum = Decimal(1).scaleb(-scale)

    def get_col_spec(self, **kw: Any) -> str:
        return f"NUMERIC({self.precision}, {self.scale})"

    @property
    def python_type(self) -> type[Decimal]:
        return Decimal

    def bind_processor(self, dialect: Dialect) -> Any:
        def process(value: Any) -> Any:
            if value is None:
                return None
            return format(Decimal(value), "f") if not isinstance(value, str) else value

        return process

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        quantum = self._quantum

        def process(value: Any) -> Decimal | None:
            if value is None:
                return None
            if isinstance(value, float):
                value = repr(value)
            return Decimal(value).quantize(quantum)

        return process


# --- column type helpers: MySQL type first, SQLite variant where SQLite cannot render it ----


def _bigint() -> sa.types.TypeEngine[int]:
    # INTEGER (not BIGINT) on SQLite so that an INTEGER PRIMARY KEY is the rowid alias.
    return mysql.BIGINT(unsigned=True).with_variant(sa.Integer(), "sqlite")


def _int(unsigned: bool = False) -> sa.types.TypeEngine[int]:
    return mysql.INTEGER(unsigned=unsigned).with_variant(sa.Integer(), "sqlite")


def _bool() -> sa.types.TypeEngine[int]:
    # TINYINT(1) is MySQL's BOOLEAN; both backends return plain 0/1 ints.
    return mysql.TINYINT(1).with_variant(sa.Integer(), "sqlite")


def _decimal(precision: int, scale: int) -> sa.types.TypeEngine[Any]:
    return mysql.DECIMAL(precision, scale).with_variant(SqliteDecimal(precision, scale), "sqlite")


def _datetime() -> sa.types.TypeEngine[Any]:
    # SQLite stores "YYYY-MM-DD HH:MM:SS.ffffff" text (SQLAlchemy's default storage format).
    return mysql.DATETIME(fsp=6).with_variant(sa.DateTime(), "sqlite")


def _timestamp() -> sa.types.TypeEngine[Any]:
    return mysql.TIMESTAMP(fsp=6).with_variant(sa.DateTime(), "sqlite")


def _enum(*values: str) -> sa.types.TypeEngine[str]:
    # SQLite: VARCHAR plus a CHECK constraint, the closest thing to an ENUM.
    return mysql.ENUM(*values).with_variant(
        sa.Enum(*values, native_enum=False, create_constraint=True), "sqlite"
    )


def _json() -> sa.types.TypeEngine[Any]:
    # MariaDB turns JSON into LONGTEXT + CHECK (json_valid(...)); MySQL has a native JSON type.
    # none_as_null: Python None is SQL NULL, not the JSON text 'null'.
    return mysql.JSON(none_as_null=True).with_variant(sa.JSON(none_as_null=True), "sqlite")


def _varchar(length: int) -> sa.String:
    return sa.String(length)


def _updated_at(nullable: bool = False) -> sa.Column[Any]:
    # The incremental-extraction cursor: indexed so "WHERE updated_at > :last" is a range scan.
    return sa.Column("updated_at", _datetime(), nullable=nullable, index=True)


def _created_at(nullable: bool = False) -> sa.Column[Any]:
    return sa.Column("created_at", _datetime(), nullable=nullable, index=True)


# ============================================================ v3_partner

partner = sa.Table(
    "partner",
    metadata,
    sa.Column("partner_id", _bigint(), primary_key=True, autoincrement=True),
    sa.Column("code", _varchar(16), nullable=False, unique=True),
    sa.Column("name", _varchar(200), nullable=False),
    sa.Column("legal_name", _varchar(255), nullable=True),
    sa.Column("status", _enum("active", "suspended", "closed"), nullable=False),
    sa.Column("is_wholesale", _bool(), nullable=False),
    sa.Column("country_code", sa.CHAR(2), nullable=False),
    sa.Column("settings", _json(), nullable=True),
    sa.Column("credit_limit", _decimal(14, 2), nullable=False),
    _created_at(),
    _updated_at(),
    schema="v3_partner",
    **MYSQL_TABLE_ARGS,
)

dealer = sa.Table(
    "dealer",
    metadata,
    sa.Column("dealer_id", _bigint(), primary_key=True, autoincrement=True),
    sa.Column("code", _varchar(16), nullable=False, unique=True),
    sa.Column("name", _varchar(200), nullable=False),
    sa.Column("region", _varchar(64), nullable=False),
    sa.Column("contact_email", _varchar(255), nullable=True),
    sa.Column("is_active", _bool(), nullable=False),
    _created_at(),
    _updated_at(),
    schema="v3_partner",
    **MYSQL_TABLE_ARGS,
)

dealer_partner_mapping = sa.Table(
    "dealer_partner_mapping",
    metadata,
    sa.Column("mapping_id", _bigint(), primary_key=True, autoincrement=True),
    sa.Column("dealer_id", _bigint(), sa.ForeignKey(dealer.c.dealer_id), nullable=False, index=True),
    sa.Column("partner_id", _bigint(), sa.ForeignKey(partner.c.partner_id), nullable=False, index=True),
    # valid_to is exclusive; NULL = the current mapping (exactly one per dealer).
    sa.Column("valid_from", sa.Date(), nullable=False),
    sa.Column("valid_to", sa.Date(), nullable=True),
    sa.Column("commission_rate", _decimal(7, 4), nullable=False),
    _created_at(),
    _updated_at(),
    schema="v3_partner",
    **MYSQL_TABLE_ARGS,
)

# ============================================================ v3_billing lookups (needed by v3_customer)

plan = sa.Table(
    "plan",
    metadata,
    sa.Column("plan_id", _bigint(), primary_key=True, autoincrement=True),
    sa.Column("code", _varchar(32), nullable=False, unique=True),
    sa.Column("name", _varchar(100), nullable=False),
    sa.Column("rate_per_minute", _decimal(10, 6), nullable=False),
    sa.Column("rate_per_sms", _decimal(10, 6), nullable=False),
    sa.Column("rate_per_mb", _decimal(10, 6), nullable=False),
    sa.Column("monthly_fee", _decimal(10, 2), nullable=False),
    sa.Column("currency", sa.CHAR(3), nullable=False),
    sa.Column("is_active", _bool(), nullable=False),
    schema="v3_billing",
    **MYSQL_TABLE_ARGS,
)

currency_rate = sa.Table(
    "currency_rate",
    metadata,
    sa.Column("currency", sa.CHAR(3), primary_key=True),
    sa.Column("name", _varchar(64), nullable=False),
    sa.Column("symbol", _varchar(8), nullable=False),
    sa.Column("minor_units", _int(unsigned=True), nullable=False),
    sa.Column("rate_to_eur", _decimal(18, 8), nullable=False),
    sa.Column("as_of", sa.Date(), nullable=False),
    sa.Column("source", _varchar(32), nullable=False),
    schema="v3_billing",
    **MYSQL_TABLE_ARGS,
)

# ============================================================ v3_customer

customer = sa.Table(
    "customer",
    metadata,
    sa.Column("customer_id", _bigint(), primary_key=True, autoincrement=True),
    sa.Column("dealer_id", _bigint(), sa.ForeignKey(dealer.c.dealer_id), nullable=False, index=True),
    sa.Column("first_name", _varchar(100), nullable=False),
    sa.Column("last_name", _varchar(100), nullable=False),
    sa.Column("company_name", _varchar(200), nullable=True),
    sa.Column("email", _varchar(255), nullable=False),
    sa.Column("phone", _varchar(32), nullable=True),
    sa.Column("country_code", sa.CHAR(2), nullable=False),
    sa.Column("status", _enum("active", "suspended", "closed"), nullable=False),
    sa.Column("is_business", _bool(), nullable=False),
    _created_at(),
    _updated_at(),
    sa.Column("last_login_at", _timestamp(), nullable=True),
    schema="v3_customer",
    **MYSQL_TABLE_ARGS,
)

customer_address = sa.Table(
    "customer_address",
    metadata,
    sa.Column("address_id", _bigint(), primary_key=True, autoincrement=True),
    sa.Column("customer_id", _bigint(), sa.ForeignKey(customer.c.customer_id), nullable=False, index=True),
    sa.Column("address_type", _enum("billing", "shipping"), nullable=False),
    sa.Column("street", _varchar(200), nullable=False),
    sa.Column("house_number", _varchar(16), nullable=True),
    sa.Column("postal_code", _varchar(16), nullable=False),
    sa.Column("city", _varchar(100), nullable=False),
    sa.Column("country_code", sa.CHAR(2), nullable=False),
    sa.Column("is_primary", _bool(), nullable=False),
    _created_at(nullable=True),
    # Legacy rows (pre-dating the audit columns) have NULL here: the extractor must cope.
    _updated_at(nullable=True),
    schema="v3_customer",
    **MYSQL_TABLE_ARGS,
)

subscription = sa.Table(
    "subscription",
    metadata,
    sa.Column("subscription_id", _bigint(), primary_key=True, autoincrement=True),
    sa.Column("customer_id", _bigint(), sa.ForeignKey(customer.c.customer_id), nullable=False, index=True),
    sa.Column("plan_id", _bigint(), sa.ForeignKey(plan.c.plan_id), nullable=False, index=True),
    sa.Column("msisdn", _varchar(20), nullable=False),
    sa.Column("status", _enum("active", "paused", "cancelled"), nullable=False),
    sa.Column("started_at", _datetime(), nullable=False),
    sa.Column("ended_at", _datetime(), nullable=True),
    sa.Column("monthly_fee", _decimal(10, 2), nullable=False),
    _created_at(),
    _updated_at(),
    schema="v3_customer",
    **MYSQL_TABLE_ARGS,
)

# ============================================================ v3_billing

invoice = sa.Table(
    "invoice",
    metadata,
    sa.Column("invoice_id", _bigint(), primary_key=True, autoincrement=True),
    sa.Column("customer_id", _bigint(), sa.ForeignKey(customer.c.customer_id), nullable=False, index=True),
    sa.Column("partner_id", _bigint(), sa.ForeignKey(partner.c.partner_id), nullable=False, index=True),
    sa.Column("invoice_number", _varchar(32), nullable=False, unique=True),
    sa.Column("period_start", sa.Date(), nullable=False),
    sa.Column("period_end", sa.Date(), nullable=False),
    sa.Column("due_date", sa.Date(), nullable=False),
    sa.Column("currency", sa.CHAR(3), sa.ForeignKey(currency_rate.c.currency), nullable=False),
    sa.Column("total_amount", _decimal(18, 4), nullable=False),
    _created_at(),
    _updated_at(),
    schema="v3_billing",
    **MYSQL_TABLE_ARGS,
)

invoice_status = sa.Table(
    "invoice_status",
    metadata,
    sa.Column("invoice_status_id", _bigint(), primary_key=True, autoincrement=True),
    # One current-status row per invoice, updated in place (no history).
    sa.Column("invoice_id", _bigint(), sa.ForeignKey(invoice.c.invoice_id), nullable=False, unique=True),
    sa.Column("status", _enum("draft", "issued", "paid", "overdue", "void"), nullable=False),
    sa.Column("changed_at", _datetime(), nullable=False),
    sa.Column("changed_by", _varchar(64), nullable=False),
    sa.Column("reason", _varchar(255), nullable=True),
    _updated_at(),
    schema="v3_billing",
    **MYSQL_TABLE_ARGS,
)

invoice_data = sa.Table(
    "invoice_data",
    metadata,
    sa.Column("invoice_data_id", _bigint(), primary_key=True, autoincrement=True),
    sa.Column("invoice_id", _bigint(), sa.ForeignKey(invoice.c.invoice_id), nullable=False, unique=True),
    sa.Column("line_count", _int(), nullable=False),
    sa.Column("net_amount", _decimal(18, 4), nullable=False),
    sa.Column("tax_amount", _decimal(18, 4), nullable=False),
    sa.Column("discount_amount", _decimal(18, 4), nullable=False),
    sa.Column("payload", _json(), nullable=False),
    sa.Column("notes", sa.Text(), nullable=True),
    _updated_at(),
    schema="v3_billing",
    **MYSQL_TABLE_ARGS,
)

payment = sa.Table(
    "payment",
    metadata,
    sa.Column("payment_id", _bigint(), primary_key=True, autoincrement=True),
    sa.Column("invoice_id", _bigint(), sa.ForeignKey(invoice.c.invoice_id), nullable=False, index=True),
    sa.Column("amount", _decimal(18, 4), nullable=False),
    sa.Column("currency", sa.CHAR(3), nullable=False),
    sa.Column("method", _enum("card", "sepa", "transfer"), nullable=False),
    sa.Column("reference", _varchar(64), nullable=False),
    sa.Column("paid_at", _datetime(), nullable=False),
    _created_at(),
    _updated_at(),
    schema="v3_billing",
    **MYSQL_TABLE_ARGS,
)

# Immutable event table: rows are only inserted, in cdr_id order, with non-decreasing
# created_at.  No foreign keys on purpose -- like real rating systems it is bulk-loaded and
# carries denormalised ids that may outlive the referenced subscription rows.
billing_cdr = sa.Table(
    "billing_cdr",
    metadata,
    sa.Column("cdr_id", _bigint(), primary_key=True, autoincrement=True),
    sa.Column("subscription_id", _bigint(), nullable=False, index=True),
    sa.Column("customer_id", _bigint(), nullable=False),
    sa.Column("partner_id", _bigint(), nullable=False),
    sa.Column("call_type", _enum("voice", "sms", "data"), nullable=False),
    sa.Column("started_at", _datetime(), nullable=False),
    sa.Column("duration_seconds", _int(unsigned=True), nullable=False),
    sa.Column("bytes_used", _bigint(), nullable=False),
    sa.Column("cost", _decimal(12, 6), nullable=False),
    sa.Column("origin", _varchar(32), nullable=False),
    sa.Column("destination", _varchar(32), nullable=False),
    sa.Column("cell_id", _varchar(32), nullable=True),
    sa.Column("is_roaming", _bool(), nullable=False),
    # Insert time, used for date windows of the extraction.
    sa.Column("created_at", _timestamp(), nullable=False, index=True),
    schema="v3_billing",
    **MYSQL_TABLE_ARGS,
)

TABLES: tuple[sa.Table, ...] = (
    partner,
    dealer,
    dealer_partner_mapping,
    plan,
    currency_rate,
    customer,
    customer_address,
    subscription,
    invoice,
    invoice_status,
    invoice_data,
    payment,
    billing_cdr,
)
"""All tables by schema, parents before children (insert order; reverse it for deletes)."""


def table_key(table: sa.Table) -> str:
    """``schema.table`` -- the key used in every dict this package returns."""
    return f"{table.schema}.{table.name}"


# ============================================================ engines and DDL


def is_sqlite(engine: Engine | sa.Connection) -> bool:
    return engine.dialect.name == "sqlite"


def sqlite_engine(directory: Path, **kwargs: Any) -> Engine:
    """Engine on ``directory/main.sqlite`` with one attached database file per schema.

    The ATTACHes run in a ``connect`` event so that every pooled connection sees the
    schemas.  Foreign keys are enforced (SQLite only enforces them within one attached
    file; SQLAlchemy does not emit cross-schema ones for SQLite).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{directory / 'main.sqlite'}", **kwargs)

    @event.listens_for(engine, "connect")
    def _attach(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for schema in SCHEMAS:
                # The alias is an identifier (cannot be a bind parameter); SCHEMAS are constants.
                cursor.execute(f"ATTACH DATABASE ? AS {schema}", (str(directory / f"{schema}.sqlite"),))
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    return engine


def mysql_engine(url: str | sa.URL, *, local_infile: bool = True, **kwargs: Any) -> Engine:
    """Engine for a MySQL/MariaDB source whose sessions run in UTC.

    ``TIMESTAMP`` columns are converted through the session time zone; pinning it to UTC
    keeps them consistent with the naive-UTC DATETIME columns.  ``local_infile`` lets
    :func:`datalake.demo.generator.seed_source` use ``LOAD DATA LOCAL INFILE``.
    """
    connect_args: dict[str, Any] = {"init_command": "SET time_zone = '+00:00'"}
    if local_infile:
        connect_args["local_infile"] = True
    connect_args.update(kwargs.pop("connect_args", {}))
    return sa.create_engine(url, connect_args=connect_args, **kwargs)


def _quote(engine: Engine | sa.Connection, name: str) -> str:
    return engine.dialect.identifier_preparer.quote_identifier(name)


def create_schemas(engine: Engine) -> None:
    """Create the three MySQL databases (no-op on SQLite: the ATTACH creates the files)."""
    if is_sqlite(engine):
        return
    with engine.begin() as conn:
        for schema in SCHEMAS:
            conn.exec_driver_sql(
                f"CREATE DATABASE IF NOT EXISTS {_quote(conn, schema)} "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )


def create_tables(engine: Engine) -> None:
    """Create the schemas and all tables that do not exist yet."""
    create_schemas(engine)
    metadata.create_all(engine, checkfirst=True)


def drop_schemas(engine: Engine) -> None:
    """Remove the demo source: drop the MySQL databases, or all tables on SQLite."""
    if is_sqlite(engine):
        metadata.drop_all(engine, checkfirst=True)
        return
    with engine.connect() as conn:
        # The schemas reference each other both ways (subscription -> plan, invoice ->
        # customer), so no drop order satisfies the cross-database foreign keys.
        conn.exec_driver_sql("SET foreign_key_checks = 0")
        try:
            for schema in SCHEMAS:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {_quote(conn, schema)}")
        finally:
            conn.exec_driver_sql("SET foreign_key_checks = 1")
        conn.commit()
