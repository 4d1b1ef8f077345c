"""TLS to the V3 source, against a MariaDB that offers TLS with a throwaway PKI (see ``tls.py``).

The source users here are created ``REQUIRE SSL`` (or ``REQUIRE X509``): the server itself
refuses them a plain connection, so an extraction that succeeds proves that every connection it
made — the planning connection (PyMySQL) and the Arrow-native reader's (connectorx) — was
encrypted. The first test shows that refusal, so the others can fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from datalake.source import V3SourceResource
from datalake_tests.bronze_harness import SCHEMA, BronzeHarness, meta
from datalake_tests.services import MariaDBServer
from datalake_tests.tls import PKI

pytestmark = pytest.mark.mariadb

TLS_USER, TLS_PASSWORD = "tls_reader", "tls-reader-pw"
X509_USER, X509_PASSWORD = "x509_reader", "x509-reader-pw"
ROWS = 500


@pytest.fixture(scope="module")
def tls_source(tls_mariadb_server: MariaDBServer) -> Iterator[MariaDBServer]:
    """Users that the server admits over TLS only, and a table of exact types to read."""
    admin = sa.create_engine(tls_mariadb_server.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for user, password, require in ((TLS_USER, TLS_PASSWORD, "SSL"), (X509_USER, X509_PASSWORD, "X509")):
            conn.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")
            conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}' REQUIRE {require}")
            conn.exec_driver_sql(f"GRANT SELECT, PROCESS ON *.* TO '{user}'@'%%'")
    admin.dispose()
    yield tls_mariadb_server


@pytest.fixture
def harness(
    tls_source: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[BronzeHarness]:
    h = BronzeHarness(server=tls_source, root=tmp_path, reader="auto")
    h.sql(
        f"""CREATE TABLE {SCHEMA}.ledger (
            id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
            amount DECIMAL(30,12) NOT NULL,
            note VARCHAR(40) CHARACTER SET utf8mb4,
            created_at DATETIME(6) NOT NULL, KEY (created_at))"""
    )
    h.sql(
        f"INSERT INTO {SCHEMA}.ledger SELECT 18446744073709551615 - seq, seq * 1.000000000001, "
        f"CONCAT('row ', seq, ' \U0001f512'), TIMESTAMP '2024-03-01 00:00:00' + INTERVAL seq SECOND "
        f"FROM {SCHEMA}.seq_1_to_{ROWS}"
    )
    h.register(table="ledger", primary_key=["id"], cursor={"column": "created_at", "kind": "timestamp"})
    yield h
    h.dispose()


def _as(h: BronzeHarness, monkeypatch: pytest.MonkeyPatch, user: str, password: str, **env: str) -> None:
    # The password reaches the resource as an EnvVar, resolved from the process environment.
    monkeypatch.setenv("DATALAKE_MYSQL_PASSWORD", password)
    h.extra_env = {"DATALAKE_MYSQL_USER": user, "DATALAKE_MYSQL_PASSWORD": password, **env}


def _assert_exact(h: BronzeHarness, materialization: Any) -> None:
    table = h.read(materialization).sort_by("created_at")
    assert table.num_rows == ROWS
    assert table.column("id")[0].as_py() == 18446744073709551615 - 1
    assert table.column("amount")[ROWS - 1].as_py() == Decimal(ROWS) * Decimal("1.000000000001")
    assert table.column("note")[0].as_py() == "row 1 \U0001f512"


def test_the_tls_user_is_refused_a_plain_connection(
    harness: BronzeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as(harness, monkeypatch, TLS_USER, TLS_PASSWORD, DATALAKE_MYSQL_SSL_MODE="disabled")
    with pytest.raises(Exception, match="Access denied") as failure:
        harness.run("ledger")
    assert TLS_PASSWORD not in str(failure.value)


def test_verify_identity_reads_with_the_arrow_reader_over_tls(
    harness: BronzeHarness, monkeypatch: pytest.MonkeyPatch, tls_pki: PKI
) -> None:
    # A CA alone means verify_identity: the certificate must chain to it and name 127.0.0.1.
    _as(harness, monkeypatch, TLS_USER, TLS_PASSWORD, DATALAKE_MYSQL_SSL_CA=str(tls_pki.ca))
    m = harness.run("ledger")
    assert meta(m, "datalake/reader") == "arrow"
    assert meta(m, "datalake/source").endswith("(tls verify_identity)")
    _assert_exact(harness, m)


def test_preferred_encrypts_the_arrow_reader_when_the_server_offers_tls(
    harness: BronzeHarness,
    monkeypatch: pytest.MonkeyPatch,
    tls_source: MariaDBServer,
    mariadb_server: MariaDBServer,
) -> None:
    _as(harness, monkeypatch, TLS_USER, TLS_PASSWORD)  # no TLS settings: preferred
    m = harness.run("ledger")
    assert meta(m, "datalake/reader") == "arrow"
    assert meta(m, "datalake/source").endswith("(tls preferred)")
    _assert_exact(harness, m)
    # What connectorx is told follows what the planning connection negotiated.
    for server, expected in ((tls_source, "required"), (mariadb_server, "disabled")):
        source = V3SourceResource(kind="mysql", host=server.host, port=server.port, user=server.user)
        engine = sa.create_engine(server.url())
        with engine.connect() as conn:
            assert f"ssl-mode={expected}" in source.arrow_url(conn)
        engine.dispose()


def test_verify_identity_refuses_a_host_the_certificate_does_not_name(
    harness: BronzeHarness, monkeypatch: pytest.MonkeyPatch, tls_pki: PKI
) -> None:
    # The certificate names 127.0.0.1 only; "localhost" reaches the same server.
    env = {"DATALAKE_MYSQL_HOST": "localhost", "DATALAKE_MYSQL_SSL_CA": str(tls_pki.ca)}
    _as(harness, monkeypatch, TLS_USER, TLS_PASSWORD, **env)
    with pytest.raises(Exception, match="not valid for 'localhost'"):  # the planning connection's check
        harness.run("ledger")
    # verify_ca checks the chain only: the same host is accepted, by both connections.
    _as(harness, monkeypatch, TLS_USER, TLS_PASSWORD, **env, DATALAKE_MYSQL_SSL_MODE="verify_ca")
    m = harness.run("ledger")
    assert meta(m, "datalake/reader") == "arrow"
    _assert_exact(harness, m)


def test_a_certificate_from_another_ca_is_refused_by_both_readers(
    harness: BronzeHarness, monkeypatch: pytest.MonkeyPatch, tls_pki: PKI, tls_source: MariaDBServer
) -> None:
    import connectorx as cx

    _as(harness, monkeypatch, TLS_USER, TLS_PASSWORD, DATALAKE_MYSQL_SSL_CA=str(tls_pki.other_ca))
    with pytest.raises(Exception, match="certificate verify failed") as failure:
        harness.run("ledger")
    assert TLS_PASSWORD not in str(failure.value)
    # The planning connection fails first; connectorx must refuse on its own too. (Its
    # connection pool retries for 30 s before it gives up.)
    source = V3SourceResource(
        kind="mysql",
        host=tls_source.host,
        port=tls_source.port,
        user=TLS_USER,
        password=TLS_PASSWORD,
        ssl_ca=str(tls_pki.other_ca),
    )
    assert source.tls_mode == "verify_identity"
    with harness.admin.connect() as conn:
        url = source.arrow_url(conn)
    assert "ssl-mode=verify_identity" in url and "ssl-ca=" in url
    with pytest.raises(Exception, match="certificate verify failed"):
        cx.read_sql(url, "SELECT 1 AS one", return_type="arrow")


def test_a_client_certificate_reads_with_the_row_reader(
    harness: BronzeHarness, monkeypatch: pytest.MonkeyPatch, tls_pki: PKI
) -> None:
    tls = {"DATALAKE_MYSQL_SSL_CA": str(tls_pki.ca)}
    _as(harness, monkeypatch, X509_USER, X509_PASSWORD, **tls)  # REQUIRE X509: no certificate, no entry
    with pytest.raises(Exception, match="Access denied"):
        harness.run("ledger")
    cert = {
        "DATALAKE_MYSQL_SSL_CERT": str(tls_pki.client_cert),
        "DATALAKE_MYSQL_SSL_KEY": str(tls_pki.client_key),
    }
    _as(harness, monkeypatch, X509_USER, X509_PASSWORD, **tls, **cert)
    m = harness.run("ledger")
    # connectorx cannot present a client certificate: the row reader reads, exactly as well.
    assert meta(m, "datalake/reader") == "rows"
    _assert_exact(harness, m)
