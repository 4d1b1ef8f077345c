"""Shared fixtures. The service machinery lives in ``services.py``; this file only wires it to pytest."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import sqlalchemy as sa

from datalake.settings import Settings, resolve_settings
from datalake_tests.bronze_harness import BronzeHarness
from datalake_tests.helpers import SPLIT_READS, mariadb_env
from datalake_tests.services import (
    AzuriteServer,
    ManagedServer,
    MariaDBServer,
    PostgresServer,
    ServiceStartError,
    start_azurite,
    start_mariadb,
    start_postgres,
)
from datalake_tests.tls import PKI, make_pki

_S = TypeVar("_S", bound=ManagedServer)


def _serve(start: Callable[[Path], _S], name: str, factory: pytest.TempPathFactory) -> Iterator[_S]:
    """Start a service for the session, stop it (by PID) and drop its data at the end.

    Locally a missing service skips the tests that need it; in CI it must not
    silently shrink the suite, so it fails them instead.
    """
    problem = ""
    try:
        server = start(factory.mktemp(name))
    except ServiceStartError as exc:
        # Reported after the except block, so the report is not cluttered with a chained traceback.
        problem = f"{name} could not be started: {exc}"
        server = None
    if server is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    try:
        yield server
    finally:
        server.stop()
        server.cleanup()


@pytest.fixture(scope="session")
def mariadb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBServer]:
    yield from _serve(start_mariadb, "mariadb", tmp_path_factory)


@pytest.fixture(scope="session")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def tls_mariadb_server(tmp_path_factory: pytest.TempPathFactory, tls_pki: PKI) -> Iterator[MariaDBServer]:
    """A second MariaDB that offers TLS with the test PKI's server certificate."""
    yield from _serve(lambda base: start_mariadb(base, tls=tls_pki), "mariadb-tls", tmp_path_factory)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    yield from _serve(start_postgres, "postgres", tmp_path_factory)


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    yield from _serve(start_azurite, "azurite", tmp_path_factory)


@pytest.fixture
def v3_mariadb(mariadb_server: MariaDBServer) -> Iterator[Callable[..., sa.Engine]]:
    """Seeds a fresh V3 demo source on the session's MariaDB; returns a seeding function.

    The schemas have fixed names (they are the source's), so each test drops and re-creates them.
    """
    from datalake.demo.generator import seed_source
    from datalake.demo.schema import create_schemas, drop_schemas, metadata

    engine = sa.create_engine(mariadb_server.url())

    def seed(*, cdr_rows: int = 3_000, seed: int = 7, anchor: dt.datetime | None = None) -> sa.Engine:
        drop_schemas(engine)
        create_schemas(engine)
        metadata.create_all(engine)
        seed_source(engine, seed=seed, cdr_rows=cdr_rows, anchor=anchor)
        return engine

    yield seed
    engine.dispose()


@pytest.fixture
def mariadb_settings(
    mariadb_server: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings reading the session's MariaDB (read-only user), lake under ``tmp_path/lake``."""
    # Resources receive the password as an EnvVar, resolved from the process environment.
    monkeypatch.setenv("DATALAKE_MYSQL_PASSWORD", mariadb_server.ro_password)
    return resolve_settings(mariadb_env(mariadb_server, tmp_path))


def bronze_harness(
    mariadb_server: MariaDBServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reader: str,
    env: dict[str, str] | None = None,
) -> Iterator[BronzeHarness]:
    """A fixture's harness with ``reader`` (``auto``: the Arrow reader, MySQL's default; ``rows``)."""
    # The password reaches the resource as an EnvVar, resolved from the process environment.
    monkeypatch.setenv("DATALAKE_MYSQL_PASSWORD", mariadb_server.ro_password)
    h = BronzeHarness(server=mariadb_server, root=tmp_path, reader=reader, extra_env=dict(env or {}))
    yield h
    h.dispose()


@pytest.fixture(params=["arrow", "arrow-split", "rows"])
def harness(
    request: pytest.FixtureRequest,
    mariadb_server: MariaDBServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[BronzeHarness]:
    """Bronze runs against the session's MariaDB, once per reader (``arrow``: the default for
    MySQL; ``arrow-split``: the same with every read it can split in parallel streams)."""
    reader = "rows" if request.param == "rows" else "auto"
    env = SPLIT_READS if request.param == "arrow-split" else None
    yield from bronze_harness(mariadb_server, tmp_path, monkeypatch, reader, env)
