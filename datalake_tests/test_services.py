"""The test services start, work as real servers, and stop when told."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from azure.storage.blob import BlobServiceClient
from sqlalchemy.exc import OperationalError

from datalake_tests.services import (
    AzuriteServer,
    MariaDBServer,
    PostgresServer,
    pid_is_running,
    start_azurite,
)


@pytest.mark.mariadb
def test_mariadb_users_and_time_zones(mariadb_server: MariaDBServer) -> None:
    rw = sa.create_engine(mariadb_server.url())
    ro = sa.create_engine(mariadb_server.ro_url())
    try:
        with rw.connect() as conn:
            assert "mariadb" in conn.execute(sa.text("SELECT @@version")).scalar_one().lower()
            # Needs the tz tables start_mariadb loads; without them this is error 1298.
            conn.execute(sa.text("SET time_zone = 'Europe/Berlin'"))
            offset = conn.execute(sa.text("SELECT TIMEDIFF(NOW(), UTC_TIMESTAMP())")).scalar_one()
            assert str(offset) in {"1:00:00", "2:00:00"}
            conn.execute(sa.text("CREATE DATABASE IF NOT EXISTS services_smoke"))
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS services_smoke.t (id INT PRIMARY KEY)"))
            conn.execute(sa.text("REPLACE INTO services_smoke.t VALUES (1)"))
            conn.commit()

        with ro.connect() as conn:
            assert conn.execute(sa.text("SELECT id FROM services_smoke.t")).scalar_one() == 1
            with pytest.raises(OperationalError, match="1044"):
                conn.execute(sa.text("CREATE DATABASE ro_must_not_create"))
    finally:
        rw.dispose()
        ro.dispose()


@pytest.mark.postgres
def test_postgres_roundtrip(postgres_server: PostgresServer) -> None:
    engine = sa.create_engine(postgres_server.url())
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE services_smoke (id int PRIMARY KEY, name text)"))
            conn.execute(sa.text("INSERT INTO services_smoke VALUES (1, 'one'), (2, 'two')"))
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, name FROM services_smoke ORDER BY id")).all()
            assert [tuple(r) for r in rows] == [(1, "one"), (2, "two")]
            assert conn.execute(sa.text("SELECT current_user")).scalar_one() == postgres_server.user
    finally:
        engine.dispose()


@pytest.mark.azurite
def test_azurite_blob_roundtrip(azurite_server: AzuriteServer) -> None:
    client = BlobServiceClient.from_connection_string(azurite_server.connection_string)
    container = client.create_container(f"smoke-{uuid.uuid4().hex[:8]}")
    payload = b"hello datalake\n" * 1000
    container.upload_blob("dir/hello.txt", payload)
    assert [b.name for b in container.list_blobs()] == ["dir/hello.txt"]
    assert container.download_blob("dir/hello.txt").readall() == payload


@pytest.mark.azurite
def test_stop_ends_the_process(azurite_server: AzuriteServer, tmp_path: Path) -> None:
    # The session fixture only decides skip/fail when Azurite is unavailable; a
    # private instance is stopped, since stopping the shared one would break other tests.
    server = start_azurite(tmp_path)
    assert server.pid != azurite_server.pid
    assert pid_is_running(server.pid)
    server.stop()
    assert not server.is_running()
    assert not pid_is_running(server.pid)
    server.stop()  # a second stop must be a harmless no-op
    server.cleanup()
    assert not server.location.exists()
    assert server.log_path.exists()  # logs survive for post-mortems
    assert azurite_server.is_running()
