"""Deterministic, seeded generator of the demo "V3" OLTP source.

* :func:`seed_source` fills an empty source (MySQL/MariaDB or the SQLite copy) with 30 days
  of data before an anchor.  Same seed + same anchor -> identical rows on every backend:
  all values, including primary keys, are generated in Python from ``random.Random``
  streams and inserted explicitly (auto-increment counters would diverge across backends).
* :func:`mutate` plays the OLTP system between two extractions: inserts, in-place updates
  (``updated_at = now``) and hard deletes, deterministic in ``(seed, round)`` given the
  same starting data.
* :func:`checksum` / :func:`checksums` fingerprint table contents independently of row
  order and backend, so tests can compare SQLite with MariaDB and a source with its copy.

Only integer arithmetic, ``Decimal`` and IEEE multiplications are used on random numbers
(no ``log``/``exp`` based distributions), so the data does not depend on the platform's libm.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from datalake.demo import schema as s

Log = Callable[[str], None]
T = TypeVar("T")

WINDOW = timedelta(days=30)
"""Seeded data covers the 30 days before the anchor."""

INSERT_CHUNK = 5_000
"""Rows per executemany for the ordinary tables."""

CDR_CHUNK = 50_000
"""CDRs generated (and held in memory) at a time."""

CDR_FILE_ROWS = 500_000
"""CDRs per LOAD DATA LOCAL INFILE file on MySQL (bounded temp disk, one commit each)."""

_US = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1)
_Q2 = Decimal("0.01")
_Q4 = Decimal("0.0001")
_Q8 = Decimal("0.00000001")
# The first CDR is created this long after the window start, so that started_at (created_at
# minus the call duration, at most ~62 min) still falls inside the window.
_CDR_MARGIN = timedelta(hours=2)

# ---------------------------------------------------------------- vocabulary

# Partner 1 is the wholesale partner the Rev-Sci reports are about.  Names deliberately
# include accents, ligatures and emoji (4-byte UTF-8: needs utf8mb4 end to end).
_PARTNER_NAMES = (
    "Vanguard Wholesale",
    "Nordlicht Telekom",
    "Café Connect",
    "Müller & Söhne Mobilfunk",
    "🚀 Rocket Telecom",
    "Łódź Mobile",
    "Øresund Networks",
    "Zürich Connect ✨",
    "Société des Télécoms",
    "Åland Mobil",
    "Dvořák Telco",
    "Crème Wireless",
    "Iberia Móvil",
    "📡 SkyLink",
    "Smørrebrød Mobile 🥪",
    "Göteborg Tele",
    "Überall Online",
    "Naïve Networks",
)
_LEGAL_SUFFIX = ("GmbH", "AG", "S.A.", "AB", "Sp. z o.o.", "B.V.", "Ltd", "ApS")
_FEATURES = ("roaming", "5g", "esim", "volte", "wifi_calling", "iot", "mnp", "prepaid")
_REGIONS = ("Nord", "Süd", "Ost", "West", "Île-de-France", "Bayern", "Skåne", "Małopolska", "Catalunya")
_DEALER_KINDS = ("Shop", "Mobilfunk Center", "Handy-Welt", "Telecom Store", "Kiosk 📱", "Partner Point")

_FIRST_NAMES = (
    "Anna", "Björn", "Chloé", "Dávid", "Émile", "François", "Gökhan", "Hélène", "Iñigo", "Jürgen",
    "Łukasz", "Maël", "Noémie", "Øyvind", "Pål", "Renée", "Søren", "Tomáš", "Zoë", "Ægir",
    "José", "Mia", "Lars", "Sofia", "Siobhán", "Zoltán", "Ingrid", "Marek", "Lucía", "Jan",
)  # fmt: skip
_LAST_NAMES = (
    "Müller", "Schmidt", "O'Brien", "García", "Dubois", "Nowak", "Johansson", "Rossi",
    "van der Berg", "Kowalski", "Nguyễn", "Øster", "Šimek", "Łęcki", "Andersson", "Fernández",
    "Weiß", "Jørgensen", "Ćosić", "Le Bœuf", "Smith", "Brown", "Fischer", "Lindqvist",
)  # fmt: skip
_COMPANIES = (
    "Bäckerei Sonnenschein ☀️", "Pizza 🍕 Express", "Müller Logistik", "Café Olé", "Nordic Fjord AB",
    "Ølbryggeriet", "Société Générale de Café", "Kraków IT Sp. z o.o.", "Zürcher Treuhand",
    "Hôtel Bellevue", "Smart-Home 🏠 Solutions", "Taller Peña",
)  # fmt: skip
_NOTES = (
    "Kunde wünscht Papierrechnung 📄",
    "Réclamation en cours",
    "Ratenzahlung vereinbart",
    "Betalning via autogiro",
    "Customer disputes roaming charges 🌍",
    "Płatność przelewem",
    "Gutschrift folgt",
)
_EMAIL_DOMAINS = ("example.com", "mail.example", "post.example", "web.example")


@dataclass(frozen=True)
class _Country:
    currency: str
    vat: Decimal
    dial: str
    mcc: int
    cities: tuple[str, ...]
    streets: tuple[str, ...]
    postal: str  # "#" = digit, "A" = letter


_COUNTRIES: dict[str, _Country] = {
    "DE": _Country("EUR", Decimal("0.19"), "49", 262, ("Berlin", "München", "Köln", "Düsseldorf"),
                   ("Hauptstraße", "Bahnhofstraße", "Schloßallee", "Goethestraße"), "#####"),
    "AT": _Country("EUR", Decimal("0.20"), "43", 232, ("Wien", "Graz", "Linz"),
                   ("Mariahilfer Straße", "Kärntner Straße"), "####"),
    "CH": _Country("CHF", Decimal("0.081"), "41", 228, ("Zürich", "Genève", "Basel"),
                   ("Bahnhofstrasse", "Rue du Rhône"), "####"),
    "FR": _Country("EUR", Decimal("0.20"), "33", 208, ("Paris", "Lyon", "Besançon"),
                   ("Rue de la Paix", "Avenue des Champs-Élysées", "Rue de Rivoli"), "#####"),
    "NL": _Country("EUR", Decimal("0.21"), "31", 204, ("Amsterdam", "Den Haag"),
                   ("Keizersgracht", "Prinsengracht"), "#### AA"),
    "SE": _Country("SEK", Decimal("0.25"), "46", 240, ("Stockholm", "Göteborg", "Malmö"),
                   ("Kungsgatan", "Drottninggatan", "Storgatan"), "### ##"),
    "PL": _Country("PLN", Decimal("0.23"), "48", 260, ("Kraków", "Łódź", "Gdańsk"),
                   ("ul. Floriańska", "ul. Piotrkowska", "ul. Długa"), "##-###"),
    "ES": _Country("EUR", Decimal("0.21"), "34", 214, ("Madrid", "A Coruña", "Málaga"),
                   ("Calle Mayor", "Avenida de Andalucía"), "#####"),
    "DK": _Country("DKK", Decimal("0.25"), "45", 238, ("København", "Århus"),
                   ("Østerbrogade", "Strøget"), "####"),
    "GB": _Country("GBP", Decimal("0.20"), "44", 234, ("London", "Manchester"),
                   ("High Street", "Baker Street"), "AA# #AA"),
}  # fmt: skip
_COUNTRY_CODES = tuple(_COUNTRIES)
_COUNTRY_WEIGHTS = (40, 8, 8, 10, 6, 8, 8, 6, 3, 3)

# (plan_id, code, name, rate/min, rate/sms, rate/MB, monthly fee, currency, is_active)
_PLANS = (
    (1, "BASIC_S", "Basic S", "0.090000", "0.090000", "0.020000", "9.99", "EUR", 1),
    (2, "BASIC_M", "Basic M", "0.050000", "0.080000", "0.010000", "19.99", "EUR", 1),
    (3, "UNLIMITED", "Unlimited Ωmega", "0.000000", "0.000000", "0.001500", "49.99", "EUR", 1),
    (4, "DATA_XL", "Data XL 🚀", "0.120000", "0.100000", "0.002500", "29.99", "EUR", 1),
    (5, "BUSINESS", "Business", "0.040000", "0.060000", "0.005000", "39.00", "EUR", 1),
    (6, "BUSINESS_UK", "Business UK", "0.035000", "0.050000", "0.004000", "35.00", "GBP", 1),
    (7, "IOT_CH", "IoT Schweiz", "0.200000", "0.150000", "0.008000", "4.50", "CHF", 1),
    (8, "PREPAID_OLD", "Prepaid (alt)", "0.190000", "0.190000", "0.240000", "0.00", "EUR", 0),
)
_PRIVATE_PLANS = (1, 2, 3, 4)
_BUSINESS_PLANS = (5, 6, 7)

# (currency, name, symbol, minor units, rate to EUR)
_CURRENCIES = (
    ("EUR", "Euro", "€", 2, "1.00000000"),
    ("USD", "US Dollar", "$", 2, "0.92370000"),
    ("GBP", "Pound Sterling", "£", 2, "1.16820000"),
    ("CHF", "Schweizer Franken", "CHF", 2, "1.04730000"),
    ("SEK", "Svensk krona", "kr", 2, "0.08712000"),
    ("DKK", "Dansk krone", "kr.", 2, "0.13405000"),
    ("PLN", "Złoty polski", "zł", 2, "0.23124000"),
    ("NOK", "Norsk krone", "kr", 2, "0.08534000"),
)

# ---------------------------------------------------------------- small helpers


def default_anchor() -> datetime:
    """Today's midnight, UTC, as a naive datetime."""
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)


def _utc_naive(value: datetime) -> datetime:
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def _prepare(conn: sa.Connection) -> None:
    """Per-connection session setup: TIMESTAMP columns are read and written in UTC."""
    if not s.is_sqlite(conn):
        conn.exec_driver_sql("SET time_zone = '+00:00'")


def _ts(rng: random.Random, lo: datetime, hi: datetime) -> datetime:
    """Uniform timestamp in [lo, hi) with microsecond resolution (lo if the range is empty)."""
    span = (hi - lo) // _US
    return lo + timedelta(microseconds=rng.randrange(span)) if span > 0 else lo


def _pick(rng: random.Random, options: Sequence[T], weights: Sequence[float]) -> T:
    return rng.choices(options, weights=weights)[0]


def _money(rng: random.Random, lo: int, hi: int, places: int) -> Decimal:
    """Random Decimal in [lo, hi) units of 10**-places -- exact, no float involved."""
    return Decimal(rng.randrange(lo, hi)).scaleb(-places)


def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _postal(rng: random.Random, fmt: str) -> str:
    return "".join(
        str(rng.randrange(10)) if ch == "#" else chr(65 + rng.randrange(26)) if ch == "A" else ch
        for ch in fmt
    )


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _insert(conn: sa.Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
    for chunk in _chunks(rows, INSERT_CHUNK):
        conn.execute(table.insert(), list(chunk))


def _has_updated_at(table: sa.Table) -> bool:
    return "updated_at" in table.c


def _pk(table: sa.Table) -> sa.Column[Any]:
    (column,) = table.primary_key.columns
    return column


# ---------------------------------------------------------------- invoices (shared by seed and mutate)


def _invoice_amounts(
    rng: random.Random, vat: Decimal, fee: Decimal, currency: str
) -> tuple[dict[str, Any], Decimal, Decimal, Decimal, Decimal]:
    """Invoice lines -> (payload, net, discount, tax, total), all exact Decimals."""
    lines: list[tuple[str, int, Decimal]] = [("base_fee", 1, fee.quantize(_Q4))]
    for kind, probability, max_qty in (
        ("voice", 0.8, 900),
        ("sms", 0.4, 300),
        ("data", 0.9, 40_000),
        ("roaming", 0.15, 200),
    ):
        if rng.random() < probability:
            lines.append((kind, rng.randrange(1, max_qty), _money(rng, 5_000, 900_000, 4)))
    net = sum((amount for _, _, amount in lines), Decimal("0.0000"))
    discount = (
        (net * Decimal("0.05")).quantize(_Q4, ROUND_HALF_UP) if rng.random() < 0.15 else Decimal("0.0000")
    )
    tax = ((net - discount) * vat).quantize(_Q4, ROUND_HALF_UP)
    total = net - discount + tax
    payload = {
        "generator": "v3-demo",
        "currency": currency,
        "vat_rate": str(vat),
        # Amounts as strings: JSON floats would not survive as exact decimals.
        "lines": [{"type": kind, "quantity": qty, "amount": str(amount)} for kind, qty, amount in lines],
    }
    return payload, net, discount, tax, total


def _invoice_number(period_start: date, invoice_id: int) -> str:
    return f"INV{period_start:%Y%m}-{invoice_id:08d}"


# ---------------------------------------------------------------- CDRs


@dataclass(frozen=True, slots=True)
class _CdrSource:
    """What a CDR needs to know about the subscription it is rated for."""

    started_us: int  # subscription start, microseconds since the epoch
    subscription_id: int
    customer_id: int
    partner_id: int  # partner of the customer's dealer from switch_us on ...
    previous_partner_id: int  # ... and before it
    switch_us: int
    msisdn: str
    rate_minute_micro: int  # plan rates in millionths of the plan currency
    rate_sms_micro: int
    rate_mb_micro: int
    mcc: int


def _micro(value: Decimal) -> int:
    return int(value.scaleb(6))


def _dt_text(us: int) -> str:
    # The text form both backends accept and that SQLAlchemy's SQLite DateTime stores/parses.
    return (_EPOCH + timedelta(microseconds=us)).isoformat(sep=" ", timespec="microseconds")


def _generate_cdrs(
    rng: random.Random,
    sources: Sequence[_CdrSource],
    count: int,
    first_id: int,
    lo_us: int,
    hi_us: int,
    *,
    spread_from_lo: bool,
) -> Iterator[list[tuple[Any, ...]]]:
    """Yield CDR rows (tuples in billing_cdr column order) in chunks of CDR_CHUNK.

    created_at is spread evenly over [lo, hi] and non-decreasing in cdr_id order, as an
    append-only rating system writes them.  Each CDR is rated for a subscription that had
    already started (sources must be sorted by started_us).
    """
    span = hi_us - lo_us
    pointer = 0
    chunk: list[tuple[Any, ...]] = []
    for i in range(count):
        # Seeding spreads from lo (first row at lo); mutate ends exactly at hi (= now).
        created_us = lo_us + (i * span) // count if spread_from_lo else lo_us + ((i + 1) * span) // count
        while pointer < len(sources) and sources[pointer].started_us <= created_us:
            pointer += 1
        src = sources[int(rng.random() * max(pointer, 1))]
        kind = rng.random()
        roaming = rng.random() < 0.05
        if kind < 0.55:
            call_type = "voice"
            duration = rng.randrange(1, 600) if rng.random() < 0.9 else rng.randrange(600, 3600)
            bytes_used = 0
            cost = (duration * src.rate_minute_micro + 59) // 60  # per-second rating, rounded up
            destination = f"+{rng.randrange(10**10, 10**11)}"
        elif kind < 0.7:
            call_type = "sms"
            duration = 0
            bytes_used = 0
            cost = src.rate_sms_micro
            destination = f"+{rng.randrange(10**10, 10**11)}"
        else:
            call_type = "data"
            duration = rng.randrange(1, 3600)
            r = rng.random()
            bytes_used = 1_000 + int(r * r * r * 200_000_000)
            cost = bytes_used * src.rate_mb_micro // 1_048_576
            destination = "apn:internet.v3"
        if roaming:
            cost *= 3
        delay_us = rng.randrange(1_000_000, 120_000_000)  # mediation delay before the insert
        started_us = created_us - duration * 1_000_000 - delay_us
        cell_id = f"{src.mcc}-{rng.randrange(1, 65_535)}" if rng.random() < 0.97 else None
        chunk.append(
            (
                first_id + i,
                src.subscription_id,
                src.customer_id,
                src.partner_id if created_us >= src.switch_us else src.previous_partner_id,
                call_type,
                _dt_text(started_us),
                duration,
                bytes_used,
                f"{cost // 1_000_000}.{cost % 1_000_000:06d}",
                src.msisdn,
                destination,
                cell_id,
                int(roaming),
                _dt_text(created_us),
            )
        )
        if len(chunk) >= CDR_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _mysql_bulk_engine(engine: Engine) -> Engine:
    """A throw-away engine like ``engine`` but with LOAD DATA LOCAL enabled on the client."""
    return sa.create_engine(
        engine.url,
        connect_args={"local_infile": True, "init_command": "SET time_zone = '+00:00'"},
        poolclass=sa.NullPool,
    )


def _load_data_sql(conn: sa.Connection, table: sa.Table) -> str:
    preparer = conn.dialect.identifier_preparer
    columns = ", ".join(preparer.quote(c.name) for c in table.columns)
    # Identifiers come from SQLAlchemy's quoting, the file name is a bind parameter.  The
    # defaults (tab separated, \n lines, backslash escapes, \N = NULL) are what we write.
    return (
        f"LOAD DATA LOCAL INFILE %s INTO TABLE {preparer.format_table(table)} "
        f"CHARACTER SET utf8mb4 ({columns})"
    )


def _tsv_line(row: tuple[Any, ...]) -> str:
    # CDR values never contain tabs, newlines or backslashes, so no escaping is needed.
    return "\t".join("\\N" if v is None else str(v) for v in row)


def _write_cdrs(
    engine: Engine, batches: Iterable[list[tuple[Any, ...]]], total: int, log: Log | None
) -> None:
    """Insert generated CDR batches: LOAD DATA LOCAL INFILE on MySQL when the server allows
    it (10M rows in minutes), otherwise executemany of pre-formatted tuples."""
    table = s.billing_cdr
    compiled = sa.insert(table).compile(dialect=engine.dialect)
    insert_sql = str(compiled)
    # Raw DBAPI executemany (SQLAlchemy's per-value processing is the bottleneck at 10M
    # rows); pymysql's paramstyle is named, sqlite3's positional.
    names = [c.name for c in table.columns]
    if compiled.positional:
        assert list(compiled.positiontup or ()) == names
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if log is not None:
            log(f"billing_cdr: {done:,}/{total:,} rows")

    if not s.is_sqlite(engine):
        bulk = _mysql_bulk_engine(engine)
        try:
            with bulk.connect() as conn, tempfile.TemporaryDirectory(prefix="v3-cdr-") as tmp:
                load_sql = _load_data_sql(conn, table)
                if _load_data_allowed(conn, load_sql, Path(tmp)):
                    _load_cdrs(conn, load_sql, batches, Path(tmp) / "cdr.tsv", progress)
                    return
        finally:
            bulk.dispose()
    # SQLite, or MySQL without local_infile: a commit per CDR_FILE_ROWS bounds the journal.
    with engine.connect() as conn:
        _prepare(conn)
        pending = 0
        for batch in batches:
            if compiled.positional:
                conn.exec_driver_sql(insert_sql, batch)  # a list of tuples: executemany
            else:
                conn.exec_driver_sql(insert_sql, [dict(zip(names, row, strict=True)) for row in batch])
            pending += len(batch)
            if pending >= CDR_FILE_ROWS:
                conn.commit()
                pending = 0
            progress(len(batch))
        conn.commit()


def _load_data_allowed(conn: sa.Connection, load_sql: str, tmp: Path) -> bool:
    probe = tmp / "probe.tsv"
    probe.write_bytes(b"")
    try:
        conn.exec_driver_sql(load_sql, (str(probe),))
    except DBAPIError:
        # Server has local_infile=OFF (MySQL 8's default): fall back to executemany.
        conn.rollback()
        return False
    conn.commit()
    return True


def _load_cdrs(
    conn: sa.Connection,
    load_sql: str,
    batches: Iterable[list[tuple[Any, ...]]],
    path: Path,
    progress: Callable[[int], None],
) -> None:
    conn.exec_driver_sql("SET time_zone = '+00:00'")
    rows_in_file = 0
    out = path.open("w", encoding="utf-8", newline="\n")

    def flush() -> None:
        nonlocal out, rows_in_file
        out.close()
        result = conn.exec_driver_sql(load_sql, (str(path),))
        # LOCAL implies IGNORE: bad values become warnings instead of errors, so check both.
        warnings = conn.exec_driver_sql("SELECT @@warning_count").scalar_one()
        if result.rowcount != rows_in_file or warnings:
            shown = conn.exec_driver_sql("SHOW WARNINGS LIMIT 5").all()
            raise RuntimeError(f"LOAD DATA loaded {result.rowcount} of {rows_in_file} CDR rows: {shown}")
        conn.commit()
        progress(rows_in_file)
        rows_in_file = 0
        out = path.open("w", encoding="utf-8", newline="\n")

    try:
        for batch in batches:
            out.write("\n".join(map(_tsv_line, batch)))
            out.write("\n")
            rows_in_file += len(batch)
            if rows_in_file >= CDR_FILE_ROWS:
                flush()
        if rows_in_file:
            flush()
    finally:
        out.close()


# ---------------------------------------------------------------- seeding


@dataclass
class _Dealer:
    dealer_id: int
    partner_id: int  # current partner
    previous_partner_id: int
    switch_at: datetime  # partner_id applies from here on (window start if never switched)


@dataclass
class _Customer:
    customer_id: int
    dealer: _Dealer
    country: str
    is_business: bool
    created_at: datetime
    fee: Decimal  # sum of the subscription fees, the invoice base line


def _sizes(cdr_rows: int) -> tuple[int, int]:
    """(customers, partners) for a CDR volume: the dimension tables grow with the fact table."""
    customers = max(200, cdr_rows // 100)
    partners = min(50, max(5, customers // 400))
    return customers, partners


def _ensure_empty(conn: sa.Connection) -> None:
    for table in s.TABLES:
        if conn.execute(sa.select(sa.literal(1)).select_from(table).limit(1)).first() is not None:
            raise RuntimeError(
                f"{s.table_key(table)} already contains rows; drop the source first (drop_schemas / --drop)"
            )


def seed_source(
    engine: Engine,
    *,
    seed: int = 42,
    cdr_rows: int = 20_000,
    anchor: datetime | None = None,
    log: Log | None = None,
) -> dict[str, int]:
    """Create the V3 tables and fill them with 30 days of data before ``anchor``.

    Returns the row count per ``schema.table``.  The target tables must be empty.
    """
    anchor = _utc_naive(anchor) if anchor is not None else default_anchor()
    start = anchor - WINDOW
    rng = random.Random(seed)
    # A separate stream for the CDRs, so the (huge) CDR generation can be chunked freely.
    cdr_rng = random.Random(rng.getrandbits(64))
    n_customers, n_partners = _sizes(cdr_rows)

    s.create_tables(engine)
    counts: dict[str, int] = {s.table_key(t): 0 for t in s.TABLES}
    with engine.begin() as conn:
        _prepare(conn)
        _ensure_empty(conn)
        sources = _seed_dimensions(conn, rng, start, anchor, n_customers, n_partners, counts, log)

    lo_us = (start + _CDR_MARGIN - _EPOCH) // _US
    hi_us = (anchor - _EPOCH) // _US
    batches = _generate_cdrs(cdr_rng, sources, cdr_rows, 1, lo_us, hi_us, spread_from_lo=True)
    _write_cdrs(engine, batches, cdr_rows, log)
    counts[s.table_key(s.billing_cdr)] = cdr_rows
    return counts


def _seed_dimensions(
    conn: sa.Connection,
    rng: random.Random,
    start: datetime,
    end: datetime,
    n_customers: int,
    n_partners: int,
    counts: dict[str, int],
    log: Log | None,
) -> list[_CdrSource]:
    def insert(table: sa.Table, rows: list[dict[str, Any]]) -> None:
        _insert(conn, table, rows)
        counts[s.table_key(table)] += len(rows)
        if log is not None:
            log(f"{s.table_key(table)}: {counts[s.table_key(table)]:,} rows")

    # --- lookups
    as_of = (end - timedelta(days=1)).date()
    insert(
        s.currency_rate,
        [
            {
                "currency": c,
                "name": n,
                "symbol": sym,
                "minor_units": mu,
                "rate_to_eur": Decimal(r),
                "as_of": as_of,
                "source": "ECB",
            }
            for c, n, sym, mu, r in _CURRENCIES
        ],
    )
    insert(
        s.plan,
        [
            {
                "plan_id": pid,
                "code": code,
                "name": name,
                "rate_per_minute": Decimal(rm),
                "rate_per_sms": Decimal(rs),
                "rate_per_mb": Decimal(rmb),
                "monthly_fee": Decimal(fee),
                "currency": cur,
                "is_active": active,
            }
            for pid, code, name, rm, rs, rmb, fee, cur, active in _PLANS
        ],
    )
    plan_by_id = {p[0]: p for p in _PLANS}

    # --- partners: onboarded in the first day of the window
    partners: list[dict[str, Any]] = []
    for pid in range(1, n_partners + 1):
        base = _PARTNER_NAMES[(pid - 1) % len(_PARTNER_NAMES)]
        name = base if pid <= len(_PARTNER_NAMES) else f"{base} {pid}"
        created = _ts(rng, start, start + timedelta(days=1))
        country = _pick(rng, _COUNTRY_CODES, _COUNTRY_WEIGHTS)
        partners.append(
            {
                "partner_id": pid,
                "code": f"P{pid:04d}",
                "name": name,
                "legal_name": f"{name} {rng.choice(_LEGAL_SUFFIX)}" if rng.random() < 0.85 else None,
                "status": "active"
                if pid == 1
                else _pick(rng, ("active", "suspended", "closed"), (80, 12, 8)),
                "is_wholesale": 1 if pid == 1 else int(rng.random() < 0.3),
                "country_code": country,
                "settings": {
                    "billing_day": rng.randrange(1, 29),
                    "invoice_language": rng.choice(("de", "en", "fr", "sv", "pl")),
                    "features": sorted(rng.sample(_FEATURES, rng.randrange(1, 5))),
                    "sla": {
                        "tier": rng.choice(("bronze", "silver", "gold")),
                        "response_hours": rng.choice((4, 8, 24)),
                    },
                    "contact": {"name": f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"},
                }
                if rng.random() < 0.9
                else None,
                "credit_limit": _money(rng, 100_000, 50_000_000, 2),
                "created_at": created,
                "updated_at": _ts(rng, created, end),
            }
        )
    insert(s.partner, partners)

    # --- dealers (2-4 per partner) and their partner history
    dealers: list[_Dealer] = []
    dealer_rows: list[dict[str, Any]] = []
    mapping_rows: list[dict[str, Any]] = []
    for owner in range(1, n_partners + 1):
        for _ in range(rng.randrange(2, 5)):
            did = len(dealers) + 1
            created = _ts(rng, start, start + timedelta(days=1))
            region = rng.choice(_REGIONS)
            dealer_rows.append(
                {
                    "dealer_id": did,
                    "code": f"D{did:05d}",
                    "name": f"{rng.choice(_DEALER_KINDS)} {region} {did}",
                    "region": region,
                    "contact_email": f"dealer{did}@{rng.choice(_EMAIL_DOMAINS)}"
                    if rng.random() < 0.8
                    else None,
                    "is_active": int(rng.random() < 0.9),
                    "created_at": created,
                    "updated_at": _ts(rng, created, end),
                }
            )
            commission = _money(rng, 250, 1_500, 4)
            if rng.random() < 0.2:
                # Moved from another partner during the window: the closed mapping ends
                # (exclusive) on the day the current one starts.
                previous = rng.choice([p for p in range(1, n_partners + 1) if p != owner])
                switch_day = start.date() + timedelta(days=rng.randrange(5, 25))
                switch_at = datetime.combine(switch_day, datetime.min.time())
                closed_at = _ts(rng, switch_at, switch_at + timedelta(hours=8))
                mapping_rows.append(
                    {
                        "mapping_id": len(mapping_rows) + 1,
                        "dealer_id": did,
                        "partner_id": previous,
                        "valid_from": created.date(),
                        "valid_to": switch_day,
                        "commission_rate": _money(rng, 250, 1_500, 4),
                        "created_at": created,
                        "updated_at": closed_at,
                    }
                )
                mapping_rows.append(
                    {
                        "mapping_id": len(mapping_rows) + 1,
                        "dealer_id": did,
                        "partner_id": owner,
                        "valid_from": switch_day,
                        "valid_to": None,
                        "commission_rate": commission,
                        "created_at": closed_at,
                        "updated_at": closed_at,
                    }
                )
            else:
                previous, switch_at = owner, start
                mapping_rows.append(
                    {
                        "mapping_id": len(mapping_rows) + 1,
                        "dealer_id": did,
                        "partner_id": owner,
                        "valid_from": created.date(),
                        "valid_to": None,
                        "commission_rate": commission,
                        "created_at": created,
                        "updated_at": created,
                    }
                )
            dealers.append(_Dealer(did, owner, previous, switch_at))
    insert(s.dealer, dealer_rows)
    insert(s.dealer_partner_mapping, mapping_rows)
    del dealer_rows, mapping_rows

    # --- customers (ids in creation order, skewed towards the window start: an existing
    # base plus a trickle of sign-ups), one or two addresses, one to three subscriptions.
    span_us = (end - start - timedelta(hours=3)) // _US
    created_times = sorted(
        start + timedelta(minutes=1, microseconds=int(span_us * u * u))
        for u in (rng.random() for _ in range(n_customers))
    )
    customers: list[_Customer] = []
    sources: list[_CdrSource] = []
    buffers: dict[str, list[dict[str, Any]]] = {"customer": [], "address": [], "subscription": []}
    address_id = subscription_id = 0

    def flush_customers() -> None:
        insert(s.customer, buffers["customer"])
        insert(s.customer_address, buffers["address"])
        insert(s.subscription, buffers["subscription"])
        for rows in buffers.values():
            rows.clear()

    for index, created in enumerate(created_times):
        cid = index + 1
        dealer = dealers[rng.randrange(len(dealers))]
        country = _pick(rng, _COUNTRY_CODES, _COUNTRY_WEIGHTS)
        info = _COUNTRIES[country]
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        is_business = rng.random() < 0.2
        buffers["customer"].append(
            {
                "customer_id": cid,
                "dealer_id": dealer.dealer_id,
                "first_name": first,
                "last_name": last,
                "company_name": rng.choice(_COMPANIES) if is_business else None,
                "email": f"{_ascii(first)}.{_ascii(last)}.{cid}@{rng.choice(_EMAIL_DOMAINS)}",
                "phone": f"+{info.dial}{rng.randrange(10**8, 10**10)}" if rng.random() < 0.85 else None,
                "country_code": country,
                "status": _pick(rng, ("active", "suspended", "closed"), (88, 7, 5)),
                "is_business": int(is_business),
                "created_at": created,
                "updated_at": created if rng.random() < 0.3 else _ts(rng, created, end),
                "last_login_at": _ts(rng, created, end) if rng.random() < 0.7 else None,
            }
        )
        for address_type in ("billing", "shipping") if rng.random() < 0.3 else ("billing",):
            address_id += 1
            legacy = rng.random() < 0.02  # pre-audit-column rows: no timestamps at all
            buffers["address"].append(
                {
                    "address_id": address_id,
                    "customer_id": cid,
                    "address_type": address_type,
                    "street": rng.choice(info.streets),
                    "house_number": f"{rng.randrange(1, 200)}{rng.choice(('', '', '', 'a', 'b'))}"
                    if rng.random() < 0.9
                    else None,
                    "postal_code": _postal(rng, info.postal),
                    "city": rng.choice(info.cities),
                    "country_code": country,
                    "is_primary": int(address_type == "billing"),
                    "created_at": None if legacy else created,
                    "updated_at": None if legacy else _ts(rng, created, end),
                }
            )
        fee_total = Decimal("0.00")
        for _ in range(_pick(rng, (1, 2, 3), (70, 25, 5))):
            subscription_id += 1
            plan_id = rng.choice(_BUSINESS_PLANS if is_business else _PRIVATE_PLANS)
            plan = plan_by_id[plan_id]
            fee = Decimal(plan[6])
            if rng.random() < 0.1:
                fee = (fee * Decimal("0.8")).quantize(_Q2, ROUND_HALF_UP)  # loyalty discount
            fee_total += fee
            started = _ts(rng, created, min(end, created + timedelta(hours=2)))
            status = _pick(rng, ("active", "paused", "cancelled"), (85, 5, 10))
            msisdn = f"+{info.dial}{rng.randrange(10**9, 10**10)}"
            buffers["subscription"].append(
                {
                    "subscription_id": subscription_id,
                    "customer_id": cid,
                    "plan_id": plan_id,
                    "msisdn": msisdn,
                    "status": status,
                    "started_at": started,
                    "ended_at": _ts(rng, started, end) if status == "cancelled" else None,
                    "monthly_fee": fee,
                    "created_at": started,
                    "updated_at": _ts(rng, started, end),
                }
            )
            sources.append(
                _CdrSource(
                    started_us=(started - _EPOCH) // _US,
                    subscription_id=subscription_id,
                    customer_id=cid,
                    partner_id=dealer.partner_id,
                    previous_partner_id=dealer.previous_partner_id,
                    switch_us=(dealer.switch_at - _EPOCH) // _US,
                    msisdn=msisdn,
                    rate_minute_micro=_micro(Decimal(plan[3])),
                    rate_sms_micro=_micro(Decimal(plan[4])),
                    rate_mb_micro=_micro(Decimal(plan[5])),
                    mcc=info.mcc,
                )
            )
        customers.append(_Customer(cid, dealer, country, is_business, created, fee_total))
        if len(buffers["customer"]) >= INSERT_CHUNK:
            flush_customers()
    flush_customers()

    _seed_invoices(conn, rng, start, end, customers, insert)
    sources.sort(key=lambda src: (src.started_us, src.subscription_id))
    return sources


def _seed_invoices(
    conn: sa.Connection,
    rng: random.Random,
    start: datetime,
    end: datetime,
    customers: list[_Customer],
    insert: Callable[[sa.Table, list[dict[str, Any]]], None],
) -> None:
    """Two fortnightly billing runs inside the window; ids follow the runs (run-major)."""
    invoices: list[dict[str, Any]] = []
    statuses: list[dict[str, Any]] = []
    data: list[dict[str, Any]] = []
    payments: list[dict[str, Any]] = []
    invoice_id = payment_id = 0

    def flush() -> None:
        insert(s.invoice, invoices)
        insert(s.invoice_status, statuses)
        insert(s.invoice_data, data)
        insert(s.payment, payments)
        for rows in (invoices, statuses, data, payments):
            rows.clear()

    for run in (0, 1):
        period_start = start.date() + timedelta(days=14 * run)
        period_end = period_start + timedelta(days=13)
        run_at = datetime.combine(period_end + timedelta(days=1), datetime.min.time())
        # Older invoices have had time to get paid; the last run is mostly still open.
        status_weights = (7, 15, 65, 10, 3) if run == 0 else (30, 55, 12, 0, 3)
        for cust in customers:
            if cust.created_at >= run_at or rng.random() >= 0.85:
                continue
            invoice_id += 1
            info = _COUNTRIES[cust.country]
            created = _ts(rng, run_at, run_at + timedelta(hours=6))
            partner_id = (
                cust.dealer.partner_id
                if created >= cust.dealer.switch_at
                else cust.dealer.previous_partner_id
            )
            payload, net, discount, tax, total = _invoice_amounts(rng, info.vat, cust.fee, info.currency)
            status = _pick(rng, ("draft", "issued", "paid", "overdue", "void"), status_weights)
            changed = created if status == "draft" else _ts(rng, created, end)
            invoices.append(
                {
                    "invoice_id": invoice_id,
                    "customer_id": cust.customer_id,
                    "partner_id": partner_id,
                    "invoice_number": _invoice_number(period_start, invoice_id),
                    "period_start": period_start,
                    "period_end": period_end,
                    "due_date": period_end + timedelta(days=15),
                    "currency": info.currency,
                    "total_amount": total,
                    "created_at": created,
                    "updated_at": _ts(rng, created, end) if rng.random() < 0.2 else created,
                }
            )
            statuses.append(
                {
                    "invoice_status_id": invoice_id,
                    "invoice_id": invoice_id,
                    "status": status,
                    "changed_at": changed,
                    "changed_by": "billing-run"
                    if status in ("draft", "issued")
                    else rng.choice(("payment-gateway", "dunning", "agent:zoë")),
                    "reason": "Storniert - Kundenwunsch" if status == "void" else None,
                    "updated_at": changed,
                }
            )
            notes = rng.choice(_NOTES) if rng.random() < 0.2 else None
            data.append(
                {
                    "invoice_data_id": invoice_id,
                    "invoice_id": invoice_id,
                    "line_count": len(payload["lines"]),
                    "net_amount": net,
                    "tax_amount": tax,
                    "discount_amount": discount,
                    "payload": payload,
                    "notes": notes,
                    "updated_at": created,
                }
            )
            if status == "paid":
                # Mostly one payment; some customers pay in two instalments.
                parts = [total]
                if rng.random() < 0.15:
                    first = (total * Decimal(rng.randrange(20, 80)) / 100).quantize(_Q4, ROUND_HALF_UP)
                    parts = [first, total - first]
                paid_times = [*sorted(_ts(rng, created, changed) for _ in parts[:-1]), changed]
                method = _pick(rng, ("card", "sepa", "transfer"), (50, 35, 15))
                for amount, paid_at in zip(parts, paid_times, strict=True):
                    payment_id += 1
                    payments.append(
                        {
                            "payment_id": payment_id,
                            "invoice_id": invoice_id,
                            "amount": amount,
                            "currency": info.currency,
                            "method": method,
                            "reference": f"{method.upper()}-{rng.getrandbits(40):010x}",
                            "paid_at": paid_at,
                            "created_at": paid_at,
                            "updated_at": paid_at,
                        }
                    )
            if len(invoices) >= INSERT_CHUNK:
                flush()
    flush()


# ---------------------------------------------------------------- mutate


class _Changes:
    """Planned inserts / updates / deletes of one mutate round, applied in FK order."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.inserts: dict[sa.Table, list[dict[str, Any]]] = {t: [] for t in s.TABLES}
        self.updates: dict[sa.Table, dict[Any, dict[str, Any]]] = {t: {} for t in s.TABLES}
        self.deletes: dict[sa.Table, list[Any]] = {t: [] for t in s.TABLES}

    def insert(self, table: sa.Table, row: dict[str, Any]) -> None:
        if _has_updated_at(table):
            row["updated_at"] = self.now
        self.inserts[table].append(row)

    def update(self, table: sa.Table, pk: Any, **values: Any) -> None:
        # Several changes to one row merge into a single UPDATE (counted once).
        if pk in self.deletes[table]:
            raise AssertionError(f"{s.table_key(table)} {pk} is both updated and deleted")
        row = self.updates[table].setdefault(pk, {})
        row.update(values)
        if _has_updated_at(table):
            row["updated_at"] = self.now

    def delete(self, table: sa.Table, pk: Any) -> None:
        self.deletes[table].append(pk)

    def apply(self, conn: sa.Connection) -> None:
        for table in s.TABLES:  # parents first
            _insert(conn, table, self.inserts[table])
        for table in s.TABLES:
            pk = _pk(table)
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for key, values in sorted(self.updates[table].items()):
                params = {"_pk": key, **{f"_v_{name}": v for name, v in values.items()}}
                groups.setdefault(tuple(sorted(values)), []).append(params)
            for columns, params_list in groups.items():
                stmt = (
                    sa.update(table)
                    .where(pk == sa.bindparam("_pk"))
                    .values({name: sa.bindparam(f"_v_{name}") for name in columns})
                )
                conn.execute(stmt, params_list)
        for table in reversed(s.TABLES):  # children first
            pk = _pk(table)
            for chunk in _chunks(sorted(self.deletes[table]), INSERT_CHUNK):
                conn.execute(sa.delete(table).where(pk.in_(chunk)))

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            s.table_key(t): {
                "inserted": len(self.inserts[t]),
                "updated": len(self.updates[t]),
                "deleted": len(self.deletes[t]),
            }
            for t in s.TABLES
        }


def _rows(conn: sa.Connection, table: sa.Table, *columns: str) -> list[sa.Row[Any]]:
    """Selected columns of all rows, in primary key order (a stable base for sampling)."""
    return list(conn.execute(sa.select(*(table.c[c] for c in columns)).order_by(_pk(table))))


def _max_id(conn: sa.Connection, table: sa.Table) -> int:
    return int(conn.execute(sa.select(sa.func.max(_pk(table)))).scalar_one() or 0)


def _sample(rng: random.Random, population: Sequence[T], k: int) -> list[T]:
    return rng.sample(list(population), min(k, len(population)))


def _latest_timestamp(conn: sa.Connection) -> datetime | None:
    latest: datetime | None = None
    for table in s.TABLES:
        for name in ("updated_at", "created_at"):
            if name in table.c:
                value = conn.execute(sa.select(sa.func.max(table.c[name]))).scalar_one()
                if isinstance(value, str):  # SQLite aggregates lose the column type
                    value = datetime.fromisoformat(value)
                if value is not None and (latest is None or value > latest):
                    latest = value
    return latest


def _default_now(conn: sa.Connection) -> datetime:
    """Wall-clock UTC, but strictly after every timestamp already in the source."""
    now = datetime.now(UTC).replace(tzinfo=None)
    latest = _latest_timestamp(conn)
    if latest is not None and now <= latest:
        now = latest + timedelta(microseconds=1_001)
    return now


def mutate(
    engine: Engine,
    *,
    seed: int,
    round: int = 1,
    now: datetime | None = None,
    log: Log | None = None,
) -> dict[str, dict[str, int]]:
    """One round of OLTP activity: inserts, updates (``updated_at = now``) and hard deletes.

    Deterministic in ``(seed, round)`` for the same starting data and ``now``.  ``now``
    defaults to the wall clock, bumped past the latest timestamp in the source; pass it
    explicitly for reproducible timestamps.  Returns ``{table: {inserted, updated, deleted}}``.
    """
    rng = random.Random(f"v3-mutate:{seed}:{round}")
    cdr_rng = random.Random(rng.getrandbits(64))
    with engine.begin() as conn:
        _prepare(conn)
        now = _utc_naive(now) if now is not None else _default_now(conn)
        changes = _Changes(now)
        _plan_mutation(conn, rng, changes)
        changes.apply(conn)
        counts = changes.counts()
        last_cdr_id = _max_id(conn, s.billing_cdr)
        last_created = conn.execute(
            sa.select(s.billing_cdr.c.created_at).where(s.billing_cdr.c.cdr_id == last_cdr_id)
        ).scalar_one_or_none()
        sources = _active_sources(conn)
    if log is not None:
        for key, value in counts.items():
            log(f"{key}: {value}")

    # New CDRs: ids continue after the last one, created_at runs up to now and never goes
    # backwards (the extraction relies on both).
    new_cdrs = max(100, min(200_000, last_cdr_id // 100)) if sources else 0
    now_us = (now - _EPOCH) // _US
    lo_us = max(now_us - 10 * 60 * 1_000_000, (last_created - _EPOCH) // _US if last_created else 0)
    hi_us = max(now_us, lo_us)
    batches = _generate_cdrs(cdr_rng, sources, new_cdrs, last_cdr_id + 1, lo_us, hi_us, spread_from_lo=False)
    _write_cdrs(engine, batches, new_cdrs, log)
    counts[s.table_key(s.billing_cdr)]["inserted"] = new_cdrs
    return counts


def _active_sources(conn: sa.Connection) -> list[_CdrSource]:
    sub, cust, mapping, plan = s.subscription, s.customer, s.dealer_partner_mapping, s.plan
    query = (
        sa.select(
            sub.c.subscription_id,
            sub.c.customer_id,
            sub.c.msisdn,
            sub.c.started_at,
            mapping.c.partner_id,
            cust.c.country_code,
            plan.c.rate_per_minute,
            plan.c.rate_per_sms,
            plan.c.rate_per_mb,
        )
        .join(cust, cust.c.customer_id == sub.c.customer_id)
        .join(plan, plan.c.plan_id == sub.c.plan_id)
        .join(mapping, sa.and_(mapping.c.dealer_id == cust.c.dealer_id, mapping.c.valid_to.is_(None)))
        .where(sub.c.status == "active")
        .order_by(sub.c.subscription_id)
    )
    sources = [
        _CdrSource(
            started_us=(r.started_at - _EPOCH) // _US,
            subscription_id=r.subscription_id,
            customer_id=r.customer_id,
            partner_id=r.partner_id,
            previous_partner_id=r.partner_id,
            switch_us=0,
            msisdn=r.msisdn,
            rate_minute_micro=_micro(r.rate_per_minute),
            rate_sms_micro=_micro(r.rate_per_sms),
            rate_mb_micro=_micro(r.rate_per_mb),
            mcc=_COUNTRIES[r.country_code].mcc if r.country_code in _COUNTRIES else 262,
        )
        for r in conn.execute(query)
    ]
    sources.sort(key=lambda src: (src.started_us, src.subscription_id))
    return sources


def _plan_mutation(conn: sa.Connection, rng: random.Random, ch: _Changes) -> None:
    now = ch.now
    today = now.date()

    # --- partners and dealers: a few attribute changes
    partner_ids = [r.partner_id for r in _rows(conn, s.partner, "partner_id")]
    for pid in _sample(rng, partner_ids, max(1, len(partner_ids) // 10)):
        if rng.random() < 0.5:
            ch.update(s.partner, pid, credit_limit=_money(rng, 100_000, 50_000_000, 2))
        else:
            ch.update(s.partner, pid, status=rng.choice(("active", "suspended")))
    dealer_rows = _rows(conn, s.dealer, "dealer_id", "is_active")
    for d in _sample(rng, dealer_rows, max(1, len(dealer_rows) // 10)):
        ch.update(
            s.dealer,
            d.dealer_id,
            is_active=1 - d.is_active,
            contact_email=f"shop{d.dealer_id}.{rng.randrange(1000)}@example.com",
        )

    # --- one dealer moves to another partner: close its current mapping, open a new one
    current = {
        r.dealer_id: r
        for r in _rows(
            conn, s.dealer_partner_mapping, "mapping_id", "dealer_id", "partner_id", "valid_from", "valid_to"
        )
        if r.valid_to is None
    }
    dealer_partner = {did: r.partner_id for did, r in current.items()}
    movable = [r for _, r in sorted(current.items()) if r.valid_from < today]
    if len(partner_ids) > 1 and movable:
        old = rng.choice(movable)
        new_partner = rng.choice([p for p in partner_ids if p != old.partner_id])
        ch.update(s.dealer_partner_mapping, old.mapping_id, valid_to=today)
        ch.insert(
            s.dealer_partner_mapping,
            {
                "mapping_id": _max_id(conn, s.dealer_partner_mapping) + 1,
                "dealer_id": old.dealer_id,
                "partner_id": new_partner,
                "valid_from": today,
                "valid_to": None,
                "commission_rate": _money(rng, 250, 1_500, 4),
                "created_at": now,
            },
        )
        dealer_partner[old.dealer_id] = new_partner

    # --- customers: sign-ups (with address and subscription) and profile changes
    customers = _rows(conn, s.customer, "customer_id", "dealer_id", "country_code", "status", "is_business")
    customer_by_id = {c.customer_id: c for c in customers}
    dealer_ids = sorted(dealer_partner)
    next_customer = _max_id(conn, s.customer) + 1
    next_address = _max_id(conn, s.customer_address) + 1
    next_subscription = _max_id(conn, s.subscription) + 1
    for _ in range(max(2, len(customers) // 200)):
        country = _pick(rng, _COUNTRY_CODES, _COUNTRY_WEIGHTS)
        info = _COUNTRIES[country]
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        created = _ts(rng, now - timedelta(hours=1), now)
        cid = next_customer
        next_customer += 1
        ch.insert(
            s.customer,
            {
                "customer_id": cid,
                "dealer_id": rng.choice(dealer_ids),
                "first_name": first,
                "last_name": last,
                "company_name": None,
                "email": f"{_ascii(first)}.{_ascii(last)}.{cid}@{rng.choice(_EMAIL_DOMAINS)}",
                "phone": f"+{info.dial}{rng.randrange(10**8, 10**10)}",
                "country_code": country,
                "status": "active",
                "is_business": 0,
                "created_at": created,
                "last_login_at": None,
            },
        )
        ch.insert(
            s.customer_address,
            {
                "address_id": next_address,
                "customer_id": cid,
                "address_type": "billing",
                "street": rng.choice(info.streets),
                "house_number": str(rng.randrange(1, 200)),
                "postal_code": _postal(rng, info.postal),
                "city": rng.choice(info.cities),
                "country_code": country,
                "is_primary": 1,
                "created_at": created,
            },
        )
        next_address += 1
        plan_id = rng.choice(_PRIVATE_PLANS)
        ch.insert(
            s.subscription,
            {
                "subscription_id": next_subscription,
                "customer_id": cid,
                "plan_id": plan_id,
                "msisdn": f"+{info.dial}{rng.randrange(10**9, 10**10)}",
                "status": "active",
                "started_at": created,
                "ended_at": None,
                "monthly_fee": Decimal(_PLANS[plan_id - 1][6]),
                "created_at": created,
            },
        )
        next_subscription += 1
    for c in _sample(rng, customers, max(3, len(customers) // 100)):
        action = rng.randrange(4)
        if action == 0:
            new_status = {"active": "suspended", "suspended": "active", "closed": "active"}[c.status]
            ch.update(s.customer, c.customer_id, status=new_status)
        elif action == 1:
            ch.update(
                s.customer, c.customer_id, email=f"neu.{c.customer_id}.{rng.randrange(10**4)}@example.com"
            )
        elif action == 2:
            ch.update(
                s.customer,
                c.customer_id,
                phone=None
                if rng.random() < 0.3
                else f"+{_COUNTRIES.get(c.country_code, _COUNTRIES['DE']).dial}{rng.randrange(10**8, 10**10)}",
            )
        else:
            ch.update(s.customer, c.customer_id, last_login_at=now)  # a TIMESTAMP column changes

    # --- addresses: deletes, edits, and a couple of legacy rows touched for the first time
    addresses = _rows(conn, s.customer_address, "address_id", "customer_id", "country_code", "updated_at")
    last_address = addresses[-1].address_id if addresses else 0
    # Never delete a table's newest row: new ids are max(id) + 1, so its id would be handed
    # out again, which a real auto-increment never does.
    for a in _sample(
        rng, [a for a in addresses if a.address_id != last_address], max(1, len(addresses) // 200)
    ):
        ch.delete(s.customer_address, a.address_id)
    deleted = set(ch.deletes[s.customer_address])
    legacy = [a for a in addresses if a.updated_at is None and a.address_id not in deleted]
    others = [a for a in addresses if a.updated_at is not None and a.address_id not in deleted]
    for a in _sample(rng, legacy, 2) + _sample(rng, others, max(2, len(addresses) // 100)):
        info = _COUNTRIES.get(a.country_code, _COUNTRIES["DE"])
        ch.update(
            s.customer_address,
            a.address_id,
            street=rng.choice(info.streets),
            house_number=str(rng.randrange(1, 300)),
            postal_code=_postal(rng, info.postal),
        )

    # --- subscriptions: deletes (data clean-up) and lifecycle changes
    subscriptions = _rows(conn, s.subscription, "subscription_id", "status", "plan_id")
    last_subscription = subscriptions[-1].subscription_id if subscriptions else 0
    candidates = [x for x in subscriptions if x.subscription_id != last_subscription]
    for x in _sample(rng, candidates, max(1, len(subscriptions) // 300)):
        ch.delete(s.subscription, x.subscription_id)
    deleted = set(ch.deletes[s.subscription])
    for x in _sample(
        rng, [x for x in candidates if x.subscription_id not in deleted], max(2, len(subscriptions) // 100)
    ):
        if x.status == "active" and rng.random() < 0.4:
            ch.update(s.subscription, x.subscription_id, status="cancelled", ended_at=now)
        elif x.status == "active":
            ch.update(s.subscription, x.subscription_id, status="paused")
        elif x.status == "paused":
            ch.update(s.subscription, x.subscription_id, status="active")
        else:
            ch.update(s.subscription, x.subscription_id, monthly_fee=_money(rng, 499, 4_999, 2))

    _plan_invoice_mutation(conn, rng, ch, customer_by_id, dealer_partner)

    # --- FX rates are refreshed daily (snapshot table: no updated_at to track it by)
    for r in _rows(conn, s.currency_rate, "currency", "rate_to_eur"):
        if r.currency != "EUR":
            factor = Decimal(1_000_000 + rng.randrange(-5_000, 5_001)) / 1_000_000
            ch.update(
                s.currency_rate, r.currency, rate_to_eur=(r.rate_to_eur * factor).quantize(_Q8), as_of=today
            )


def _plan_invoice_mutation(
    conn: sa.Connection,
    rng: random.Random,
    ch: _Changes,
    customer_by_id: dict[int, Any],
    dealer_partner: dict[int, int],
) -> None:
    now = ch.now
    today = now.date()
    inv, st, data, pay = s.invoice, s.invoice_status, s.invoice_data, s.payment
    rows = list(
        conn.execute(
            sa.select(
                inv.c.invoice_id,
                inv.c.customer_id,
                inv.c.currency,
                inv.c.total_amount,
                st.c.invoice_status_id,
                st.c.status,
                data.c.invoice_data_id,
            )
            .join(st, st.c.invoice_id == inv.c.invoice_id)
            .join(data, data.c.invoice_id == inv.c.invoice_id)
            .order_by(inv.c.invoice_id)
        )
    )
    payments = _rows(conn, pay, "payment_id", "invoice_id", "amount")
    paid: dict[int, Decimal] = {}
    payments_of: dict[int, list[int]] = {}
    for p in payments:
        paid[p.invoice_id] = paid.get(p.invoice_id, Decimal(0)) + p.amount
        payments_of.setdefault(p.invoice_id, []).append(p.payment_id)
    last_invoice = rows[-1].invoice_id if rows else 0
    touched: set[int] = set()  # invoices already changed this round

    # Hard-delete some draft/void invoices together with their status, data and payments.
    for r in _sample(
        rng,
        [r for r in rows if r.status in ("draft", "void") and r.invoice_id != last_invoice],
        max(1, len(rows) // 500),
    ):
        for payment_id in payments_of.get(r.invoice_id, []):
            ch.delete(pay, payment_id)
        ch.delete(st, r.invoice_status_id)
        ch.delete(data, r.invoice_data_id)
        ch.delete(inv, r.invoice_id)
        touched.add(r.invoice_id)

    # Reversed payments (chargebacks): the payment row disappears, the invoice is open again.
    by_invoice = {r.invoice_id: r for r in rows}
    last_payment = payments[-1].payment_id if payments else 0
    reversible = [p for p in payments if p.payment_id != last_payment and p.invoice_id not in touched]
    for p in _sample(rng, reversible, max(1, len(payments) // 300)):
        if p.invoice_id in touched:
            continue
        ch.delete(pay, p.payment_id)
        r = by_invoice[p.invoice_id]
        ch.update(
            st,
            r.invoice_status_id,
            status="issued",
            changed_at=now,
            changed_by="payment-gateway",
            reason="Rückbuchung / chargeback",
        )
        touched.add(p.invoice_id)
    deleted_payments = set(ch.deletes[pay])
    next_payment = _max_id(conn, pay) + 1

    # Status workflow: draft -> issued/void, issued -> paid/overdue, overdue -> paid.
    open_rows = [
        r for r in rows if r.invoice_id not in touched and r.status in ("draft", "issued", "overdue")
    ]
    for r in _sample(rng, open_rows, max(4, len(rows) // 50)):
        if r.status == "draft":
            new_status = "void" if rng.random() < 0.1 else "issued"
        elif r.status == "issued":
            new_status = "paid" if rng.random() < 0.7 else "overdue"
        else:
            new_status = "paid"
        ch.update(
            st,
            r.invoice_status_id,
            status=new_status,
            changed_at=now,
            changed_by="billing-run" if new_status != "paid" else "payment-gateway",
            reason=None,
        )
        touched.add(r.invoice_id)
        outstanding = r.total_amount - paid.get(r.invoice_id, Decimal(0))
        if new_status == "paid" and outstanding > 0:
            method = _pick(rng, ("card", "sepa", "transfer"), (50, 35, 15))
            ch.insert(
                pay,
                {
                    "payment_id": next_payment,
                    "invoice_id": r.invoice_id,
                    "amount": outstanding,
                    "currency": r.currency,
                    "method": method,
                    "reference": f"{method.upper()}-{rng.getrandbits(40):010x}",
                    "paid_at": now,
                    "created_at": now,
                },
            )
            next_payment += 1

    # Drafts get re-rated: new lines, amounts and total.
    drafts = [r for r in rows if r.invoice_id not in touched and r.status == "draft"]
    for r in _sample(rng, drafts, max(1, len(rows) // 200)):
        country = customer_by_id[r.customer_id].country_code
        info = _COUNTRIES.get(country, _COUNTRIES["DE"])
        payload, net, discount, tax, total = _invoice_amounts(
            rng, info.vat, _money(rng, 999, 4_999, 2), r.currency
        )
        ch.update(inv, r.invoice_id, total_amount=total)
        ch.update(
            data,
            r.invoice_data_id,
            line_count=len(payload["lines"]),
            net_amount=net,
            tax_amount=tax,
            discount_amount=discount,
            payload=payload,
        )
        touched.add(r.invoice_id)

    # Free-text notes on a few invoices; reference corrections on a few payments.
    for r in _sample(rng, [r for r in rows if r.invoice_id not in touched], max(1, len(rows) // 200)):
        ch.update(data, r.invoice_data_id, notes=rng.choice(_NOTES))
    for p in _sample(
        rng,
        [p for p in payments if p.payment_id not in deleted_payments and p.invoice_id not in touched],
        max(1, len(payments) // 200),
    ):
        ch.update(pay, p.payment_id, reference=f"CORR-{rng.getrandbits(40):010x}")

    # A billing run for the last fortnight creates new drafts.
    next_invoice = _max_id(conn, inv) + 1
    next_status = _max_id(conn, st) + 1
    next_data = _max_id(conn, data) + 1
    period_start, period_end = today - timedelta(days=14), today - timedelta(days=1)
    active = [c for c in customer_by_id.values() if c.status == "active"]
    for c in _sample(rng, active, max(3, len(customer_by_id) // 100)):
        info = _COUNTRIES.get(c.country_code, _COUNTRIES["DE"])
        payload, net, discount, tax, total = _invoice_amounts(
            rng, info.vat, _money(rng, 999, 4_999, 2), info.currency
        )
        iid = next_invoice
        next_invoice += 1
        created = _ts(rng, now - timedelta(minutes=30), now)
        ch.insert(
            inv,
            {
                "invoice_id": iid,
                "customer_id": c.customer_id,
                "partner_id": dealer_partner[c.dealer_id],
                "invoice_number": _invoice_number(period_start, iid),
                "period_start": period_start,
                "period_end": period_end,
                "due_date": today + timedelta(days=14),
                "currency": info.currency,
                "total_amount": total,
                "created_at": created,
            },
        )
        ch.insert(
            st,
            {
                "invoice_status_id": next_status + len(ch.inserts[st]),
                "invoice_id": iid,
                "status": "draft",
                "changed_at": created,
                "changed_by": "billing-run",
                "reason": None,
            },
        )
        ch.insert(
            data,
            {
                "invoice_data_id": next_data + len(ch.inserts[data]),
                "invoice_id": iid,
                "line_count": len(payload["lines"]),
                "net_amount": net,
                "tax_amount": tax,
                "discount_amount": discount,
                "payload": payload,
                "notes": None,
            },
        )


# ---------------------------------------------------------------- checksums


def _column_canonicalizer(column: sa.Column[Any]) -> Callable[[Any], Any] | None:
    """Canonical form for the column types whose Python values differ in representation
    (or are not JSON serializable); None for types that are already canonical
    (str, int, None -- and JSON documents, whose keys the row dump sorts)."""
    if isinstance(column.type, sa.Numeric):
        scale = column.type.scale
        quantum = Decimal(1).scaleb(-scale) if scale is not None else None

        def canon_decimal(value: Any) -> Any:
            if value is None:
                return None
            value = Decimal(value) if not isinstance(value, float) else Decimal(repr(value))
            return format(value.quantize(quantum) if quantum is not None else value.normalize(), "f")

        return canon_decimal
    if isinstance(column.type, (sa.DateTime, sa.Date)):
        return _canonical_value
    return None


def _canonical_value(value: Any) -> Any:
    """Fallback canonical text of one value (also json.dumps' ``default`` hook)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return _utc_naive(value).isoformat(sep=" ", timespec="microseconds")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, (str, int, dict, list)) else str(value)


def checksum(engine: Engine, table: sa.Table) -> str:
    """Order-independent fingerprint ``"<rows>:<hash>"`` of all columns of all rows.

    Each row's canonical text (Decimals at the column scale, datetimes in ISO form with
    microseconds, JSON documents with sorted keys) is hashed; the hashes are summed modulo
    2**128, so the result depends neither on row order nor on the backend holding the rows.
    """
    special = [(i, f) for i, c in enumerate(table.columns) if (f := _column_canonicalizer(c)) is not None]
    total = 0
    rows = 0
    dumps = json.JSONEncoder(
        sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_canonical_value
    ).encode
    blake2b = hashlib.blake2b
    with engine.connect() as conn:
        _prepare(conn)
        result = conn.execution_options(yield_per=10_000).execute(sa.select(table))
        for row in result:
            values = list(row)
            for i, canon in special:
                values[i] = canon(values[i])
            digest = blake2b(dumps(values).encode(), digest_size=16).digest()
            total += int.from_bytes(digest, "big")
            rows += 1
    return f"{rows}:{total % (1 << 128):032x}"


def checksums(engine: Engine) -> dict[str, str]:
    """:func:`checksum` of every table, keyed ``schema.table``."""
    return {s.table_key(t): checksum(engine, t) for t in s.TABLES}


# ---------------------------------------------------------------- embedded demo database


def demo_engine(directory: Path, *, seed: int = 42, cdr_rows: int = 20_000, log: Log | None = None) -> Engine:
    """SQLite demo source in ``directory``, seeded on first use.

    The seed runs in a sibling temp directory that is renamed into place when complete, so
    an interrupted seed never leaves a half-filled database behind (the directory exists
    only when complete).
    """
    directory = Path(directory)
    if not (directory / "main.sqlite").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.seeding-", dir=directory.parent))
        try:
            engine = s.sqlite_engine(tmp)
            try:
                seed_source(engine, seed=seed, cdr_rows=cdr_rows, log=log)
            finally:
                engine.dispose()  # pooled connections hold ATTACHes of the temp paths
            try:
                os.rename(tmp, directory)  # atomic; fails if someone else finished first
            except OSError:
                if not (directory / "main.sqlite").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return s.sqlite_engine(directory)
