"""The seeded V3 demo source: determinism (per backend and across SQLite/MariaDB), the MySQL
DDL it really produces, data invariants the extraction relies on, and ``mutate``."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from datalake.demo import schema as s
from datalake.demo.__main__ import main as cli_main
from datalake.demo.generator import WINDOW, checksum, checksums, demo_engine, mutate, seed_source
from datalake_tests.services import MariaDBServer

ANCHOR = datetime(2026, 3, 1)
NOW = datetime(2026, 3, 1, 8, 15, 30, 123456)
CDR_ROWS = 2_000
SEED = 42


def _seed_sqlite(directory: Path, *, seed: int = SEED, anchor: datetime = ANCHOR) -> sa.Engine:
    engine = s.sqlite_engine(directory)
    seed_source(engine, seed=seed, cdr_rows=CDR_ROWS, anchor=anchor)
    return engine


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One seeded SQLite source per module; tests that change data work on copies."""
    directory = tmp_path_factory.mktemp("v3-reference")
    _seed_sqlite(directory).dispose()
    return directory


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> Iterator[sa.Engine]:
    engine = s.sqlite_engine(reference_dir)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def reference_checksums(reference: sa.Engine) -> dict[str, str]:
    return checksums(reference)


@pytest.fixture
def sqlite_copy(reference_dir: Path, tmp_path: Path) -> Iterator[sa.Engine]:
    target = tmp_path / "copy"
    shutil.copytree(reference_dir, target)
    engine = s.sqlite_engine(target)
    yield engine
    engine.dispose()


def _pks(engine: sa.Engine, table: sa.Table) -> set[object]:
    (pk,) = table.primary_key.columns
    with engine.connect() as conn:
        return set(conn.execute(sa.select(pk)).scalars())


def _snapshot_pks(engine: sa.Engine) -> dict[str, set[object]]:
    return {s.table_key(t): _pks(engine, t) for t in s.TABLES}


# ---------------------------------------------------------------- SQLite


def test_sqlite_seed_is_deterministic(tmp_path: Path, reference_checksums: dict[str, str]) -> None:
    again = _seed_sqlite(tmp_path / "again")
    try:
        assert checksums(again) == reference_checksums
    finally:
        again.dispose()
    assert len(reference_checksums) >= 12
    assert all(not value.startswith("0:") for value in reference_checksums.values()), "empty table"


def test_other_seed_gives_other_data(tmp_path: Path, reference_checksums: dict[str, str]) -> None:
    other = _seed_sqlite(tmp_path / "other", seed=SEED + 1)
    try:
        different = {k for k, v in checksums(other).items() if v != reference_checksums[k]}
    finally:
        other.dispose()
    # Only the static lookups (plans, currencies) do not depend on the seed.
    assert different == {s.table_key(t) for t in s.TABLES} - {"v3_billing.plan", "v3_billing.currency_rate"}


def test_cdrs_cover_every_day_in_order(reference: sa.Engine) -> None:
    cdr = s.billing_cdr
    with reference.connect() as conn:
        rows = conn.execute(
            sa.select(cdr.c.cdr_id, cdr.c.created_at, cdr.c.started_at).order_by(cdr.c.cdr_id)
        ).all()
    assert [r.cdr_id for r in rows] == list(range(1, CDR_ROWS + 1))
    created = [r.created_at for r in rows]
    assert created == sorted(created), "created_at must not decrease in cdr_id order"
    days = {c.date() for c in created}
    assert days == {(ANCHOR - WINDOW + timedelta(days=i)).date() for i in range(30)}
    assert all(ANCHOR - WINDOW <= r.started_at <= r.created_at < ANCHOR for r in rows)


def test_all_timestamps_fall_in_the_window(reference: sa.Engine) -> None:
    with reference.connect() as conn:
        for table in s.TABLES:
            for column in table.columns:
                if isinstance(column.type, sa.DateTime):
                    low, high = conn.execute(sa.select(sa.func.min(column), sa.func.max(column))).one()
                    assert low is not None and high is not None, column
                    assert ANCHOR - WINDOW <= low <= high < ANCHOR, column


def test_sizes_and_legacy_rows(reference: sa.Engine) -> None:
    with reference.connect() as conn:

        def count(table: sa.Table, *where: sa.ColumnElement[bool] | sa.TextClause) -> int:
            return conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()

        assert count(s.customer) == 200
        assert 5 <= count(s.partner) <= 50
        assert count(s.plan) == 8
        addresses = count(s.customer_address)
        legacy = count(s.customer_address, s.customer_address.c.updated_at.is_(None))
        assert 0 < legacy < addresses * 0.06  # ~2% legacy rows without updated_at
        # Python None in a JSON column is SQL NULL, not the JSON text 'null'.
        assert count(s.partner, s.partner.c.settings.is_(None)) == count(
            s.partner, sa.text("json_type(settings) IS NULL")
        )


def test_dealer_has_one_partner_at_a_time(reference: sa.Engine) -> None:
    m = s.dealer_partner_mapping
    with reference.connect() as conn:
        rows = conn.execute(sa.select(m).order_by(m.c.dealer_id, m.c.valid_from)).all()
        dealers = set(conn.execute(sa.select(s.dealer.c.dealer_id)).scalars())
    by_dealer: dict[int, list[sa.Row[tuple[object, ...]]]] = {}
    for row in rows:
        by_dealer.setdefault(row.dealer_id, []).append(row)
    assert set(by_dealer) == dealers
    for history in by_dealer.values():
        assert [r.valid_to for r in history].count(None) == 1
        assert history[-1].valid_to is None
        for before, after in itertools.pairwise(history):
            assert before.valid_to == after.valid_from


def test_decimals_are_exact_on_sqlite(reference: sa.Engine) -> None:
    """SQLite has no DECIMAL: the amounts must still add up to the cent (no float drift)."""
    d, i = s.invoice_data, s.invoice
    with reference.connect() as conn:
        rows = conn.execute(sa.select(d.c.payload, d.c.net_amount, d.c.tax_amount, d.c.discount_amount, i.c.total_amount).join(i, i.c.invoice_id == d.c.invoice_id)).all()  # fmt: skip
    assert rows
    for payload, net, tax, discount, total in rows:
        assert isinstance(net, Decimal) and net.as_tuple().exponent == -4
        assert sum(Decimal(line["amount"]) for line in payload["lines"]) == net
        assert net - discount + tax == total


def test_demo_engine_seeds_once_atomically(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    engine = demo_engine(target, cdr_rows=500)
    try:
        first = checksums(engine)
    finally:
        engine.dispose()
    mtime = (target / "main.sqlite").stat().st_mtime_ns
    engine = demo_engine(target, cdr_rows=500)
    try:
        assert checksums(engine) == first
    finally:
        engine.dispose()
    assert (target / "main.sqlite").stat().st_mtime_ns == mtime, (
        "an existing demo source must not be re-seeded"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"], "no temp directories left behind"
    assert first["v3_billing.billing_cdr"].startswith("500:")


def test_seed_refuses_a_populated_source(sqlite_copy: sa.Engine) -> None:
    with pytest.raises(RuntimeError, match="already contains rows"):
        seed_source(sqlite_copy, cdr_rows=100, anchor=ANCHOR)


# ---------------------------------------------------------------- mutate


def test_mutate_inserts_updates_and_deletes(sqlite_copy: sa.Engine) -> None:
    before = _snapshot_pks(sqlite_copy)
    cdr = s.billing_cdr
    with sqlite_copy.connect() as conn:
        last_cdr = conn.execute(sa.select(sa.func.max(cdr.c.cdr_id))).scalar_one()
        last_created = conn.execute(sa.select(sa.func.max(cdr.c.created_at))).scalar_one()

    counts = mutate(sqlite_copy, seed=SEED, round=1, now=NOW)
    after = _snapshot_pks(sqlite_copy)

    assert set(counts) == {s.table_key(t) for t in s.TABLES}
    assert sum(c["inserted"] for c in counts.values()) > 0
    assert sum(c["updated"] for c in counts.values()) > 0
    assert sum(c["deleted"] for c in counts.values()) > 0
    for key in (
        "v3_customer.customer_address",
        "v3_customer.subscription",
        "v3_billing.payment",
        "v3_billing.invoice",
    ):
        assert counts[key]["deleted"] > 0, key
    for key in (
        "v3_customer.customer",
        "v3_billing.invoice",
        "v3_billing.invoice_status",
        "v3_billing.payment",
    ):
        assert counts[key]["inserted"] > 0 and counts[key]["updated"] > 0, key

    for table in s.TABLES:
        key = s.table_key(table)
        gone, new = before[key] - after[key], after[key] - before[key]
        assert len(gone) == counts[key]["deleted"], key  # deleted PKs are really gone ...
        assert len(new) == counts[key]["inserted"], key  # ... and new ones really there
        if "updated_at" in table.c:
            # Every inserted or updated row carries updated_at = now, and no other row does.
            with sqlite_copy.connect() as conn:
                stamped = conn.execute(
                    sa.select(sa.func.count()).select_from(table).where(table.c.updated_at == NOW)
                ).scalar_one()
            assert stamped == counts[key]["inserted"] + counts[key]["updated"], key

    # Invoices go together with their status and data rows; payments point at invoices.
    assert _invoice_ids(sqlite_copy, s.invoice_status) == after["v3_billing.invoice"]
    assert _invoice_ids(sqlite_copy, s.invoice_data) == after["v3_billing.invoice"]
    assert _invoice_ids(sqlite_copy, s.payment) <= after["v3_billing.invoice"]

    # New CDRs: higher ids, created_at up to now and never going backwards.
    with sqlite_copy.connect() as conn:
        new_rows = conn.execute(sa.select(cdr.c.cdr_id, cdr.c.created_at).where(cdr.c.cdr_id > last_cdr).order_by(cdr.c.cdr_id)).all()  # fmt: skip
    assert [r.cdr_id for r in new_rows] == list(range(last_cdr + 1, last_cdr + 1 + counts["v3_billing.billing_cdr"]["inserted"]))  # fmt: skip
    created = [r.created_at for r in new_rows]
    assert created == sorted(created) and last_created <= created[0] and created[-1] == NOW


def _invoice_ids(engine: sa.Engine, table: sa.Table) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(table.c.invoice_id)).scalars())


def test_mutate_is_deterministic(reference_dir: Path, tmp_path: Path) -> None:
    results = []
    for name in ("a", "b"):
        shutil.copytree(reference_dir, tmp_path / name)
        engine = s.sqlite_engine(tmp_path / name)
        try:
            counts = [mutate(engine, seed=7, round=r, now=NOW + timedelta(hours=r)) for r in (1, 2)]
            results.append((counts, checksums(engine)))
        finally:
            engine.dispose()
    assert results[0] == results[1]
    # A different round is different activity.
    shutil.copytree(reference_dir, tmp_path / "c")
    engine = s.sqlite_engine(tmp_path / "c")
    try:
        mutate(engine, seed=7, round=3, now=NOW + timedelta(hours=1))
        mutate(engine, seed=7, round=2, now=NOW + timedelta(hours=2))
        assert checksums(engine) != results[0][1]
    finally:
        engine.dispose()


def test_mutate_default_now_is_after_existing_data(sqlite_copy: sa.Engine) -> None:
    # Rows stamped in the future (relative to the wall clock): the default "now" must still
    # be later, or an incremental extraction with "updated_at > watermark" would miss them.
    future = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=3)
    mutate(sqlite_copy, seed=1, round=1, now=future)
    mutate(sqlite_copy, seed=1, round=2)
    c = s.customer.c
    with sqlite_copy.connect() as conn:
        latest = conn.execute(sa.select(sa.func.max(c.updated_at))).scalar_one()
        cdr_max = conn.execute(sa.select(sa.func.max(s.billing_cdr.c.created_at))).scalar_one()
    assert latest > future and cdr_max > future


# ---------------------------------------------------------------- CLI


def test_cli_seed_mutate_checksum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = str(tmp_path / "cli")
    assert cli_main(["seed", "--sqlite-dir", target, "--seed", "3", "--cdr-rows", "300", "--anchor", ANCHOR.isoformat()]) == 0  # fmt: skip
    assert "v3_billing.billing_cdr" in capsys.readouterr().out
    assert cli_main(["seed", "--sqlite-dir", target, "--cdr-rows", "300"]) == 1  # populated, no --drop
    assert "already contains rows" in capsys.readouterr().err
    assert cli_main(["seed", "--sqlite-dir", target, "--seed", "3", "--cdr-rows", "300", "--anchor", ANCHOR.isoformat(), "--drop"]) == 0  # fmt: skip
    assert (
        cli_main(["mutate", "--sqlite-dir", target, "--seed", "3", "--round", "1", "--now", NOW.isoformat()])
        == 0
    )
    out = capsys.readouterr().out
    assert "inserted" in out and "v3_billing.invoice" in out
    assert cli_main(["checksum", "--sqlite-dir", target]) == 0
    assert "v3_billing.billing_cdr                   400:" in capsys.readouterr().out


# ---------------------------------------------------------------- MariaDB


@pytest.fixture
def mariadb(mariadb_server: MariaDBServer) -> Iterator[sa.Engine]:
    """The session's MariaDB with the demo schemas dropped (the server is shared)."""
    engine = s.mysql_engine(mariadb_server.url())
    s.drop_schemas(engine)
    yield engine
    engine.dispose()


@pytest.mark.mariadb
def test_mariadb_matches_sqlite(mariadb: sa.Engine, reference_checksums: dict[str, str]) -> None:
    seed_source(mariadb, seed=SEED, cdr_rows=CDR_ROWS, anchor=ANCHOR)
    first = checksums(mariadb)
    assert first == reference_checksums
    s.drop_schemas(mariadb)
    seed_source(mariadb, seed=SEED, cdr_rows=CDR_ROWS, anchor=ANCHOR)
    assert checksums(mariadb) == first


@pytest.mark.mariadb
def test_mariadb_mutate_matches_sqlite(mariadb: sa.Engine, sqlite_copy: sa.Engine) -> None:
    seed_source(mariadb, seed=SEED, cdr_rows=CDR_ROWS, anchor=ANCHOR)
    for r in (1, 2):
        now = NOW + timedelta(hours=r)
        assert mutate(mariadb, seed=5, round=r, now=now) == mutate(sqlite_copy, seed=5, round=r, now=now)
    assert checksums(mariadb) == checksums(sqlite_copy)


@pytest.mark.mariadb
def test_mariadb_ddl_uses_the_real_types(mariadb: sa.Engine) -> None:
    seed_source(mariadb, seed=SEED, cdr_rows=200, anchor=ANCHOR)
    with mariadb.connect() as conn:
        ddl = {
            s.table_key(t): conn.exec_driver_sql(
                f"SHOW CREATE TABLE {mariadb.dialect.identifier_preparer.format_table(t)}"
            ).one()[1]
            for t in s.TABLES
        }
        everything = "\n".join(ddl.values()).lower()
        for fragment in ("decimal(", "bigint(20) unsigned", "tinyint(1)", "datetime(6)", "timestamp(6)", "enum(", "utf8mb4", "engine=innodb"):  # fmt: skip
            assert fragment in everything, fragment
        # MariaDB stores JSON as LONGTEXT guarded by json_valid(); MySQL has a JSON type.
        partner_ddl = ddl["v3_partner.partner"].lower()
        assert "json" in partner_ddl and ("json_valid" in partner_ddl or "` json" in partner_ddl)
        assert "`updated_at` datetime(6) default null" in ddl["v3_customer.customer_address"].lower()
        assert "key `ix_billing_cdr_created_at`" in ddl["v3_billing.billing_cdr"].lower()
        assert "auto_increment" in ddl["v3_billing.billing_cdr"].lower()

        # 4-byte UTF-8 survives the round trip (utf8mb4 end to end).
        name = conn.execute(
            sa.select(s.partner.c.name).where(s.partner.c.name == "🚀 Rocket Telecom")
        ).scalar_one()
        assert name == "🚀 Rocket Telecom"
        chars, octets = conn.execute(
            sa.select(sa.func.char_length(s.partner.c.name), sa.func.length(s.partner.c.name)).where(
                s.partner.c.partner_id == 5
            )
        ).one()
        assert (chars, octets) == (len(name), len(name.encode()))  # the emoji is 4 bytes


@pytest.mark.mariadb
def test_mariadb_checksums_ignore_the_session_time_zone(
    mariadb_server: MariaDBServer, mariadb: sa.Engine
) -> None:
    """TIMESTAMP columns follow the session time zone; the generator pins sessions to UTC."""
    seed_source(mariadb, seed=SEED, cdr_rows=CDR_ROWS, anchor=ANCHOR)
    berlin = sa.create_engine(
        mariadb_server.url(), connect_args={"init_command": "SET time_zone = 'Europe/Berlin'"}
    )
    try:
        with berlin.connect() as conn:
            raw = conn.execute(sa.select(sa.func.min(s.billing_cdr.c.created_at))).scalar_one()
        assert raw - (ANCHOR - WINDOW) in (timedelta(hours=3), timedelta(hours=4)), "Berlin view is shifted"
        assert checksum(berlin, s.billing_cdr) == checksum(mariadb, s.billing_cdr)
    finally:
        berlin.dispose()


@pytest.mark.mariadb
def test_mariadb_without_local_infile_falls_back(mariadb: sa.Engine, reference: sa.Engine) -> None:
    with mariadb.connect() as conn:
        conn.exec_driver_sql("SET GLOBAL local_infile = 0")
    try:
        seed_source(mariadb, seed=SEED, cdr_rows=CDR_ROWS, anchor=ANCHOR)
    finally:
        with mariadb.connect() as conn:
            conn.exec_driver_sql("SET GLOBAL local_infile = 1")
    assert checksum(mariadb, s.billing_cdr) == checksum(reference, s.billing_cdr)
