"""The environment resolver and definition loading in each environment."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import dagster as dg
import pytest

from datalake.definitions import build_definitions
from datalake.lake import DuckDBResource
from datalake.settings import GROUPS, REPO_ROOT, Environment, SettingsError, resolve_settings
from datalake_tests.helpers import PROD_ENV, clean_environ, run_cli


def test_local_defaults_use_the_repo_lake_and_the_demo_source() -> None:
    settings = resolve_settings({})
    assert settings.environment is Environment.LOCAL
    assert settings.source.kind == "demo"
    assert settings.source.demo_dir == REPO_ROOT / "tmp" / "demo_source"
    for group in GROUPS:
        assert settings.root(group) == str(REPO_ROOT / "tmp" / "dagster_data" / group)
    defs = build_definitions(settings)
    assert defs.resolve_job_def("bronze_job") is not None


def test_local_with_mysql_settings_uses_that_mysql() -> None:
    settings = resolve_settings(
        {"DATALAKE_MYSQL_HOST": "127.0.0.1", "DATALAKE_MYSQL_USER": "me", "DATALAKE_MYSQL_PORT": "3307"}
    )
    assert settings.source.kind == "mysql"
    assert settings.source.mysql is not None and settings.source.mysql.port == 3307
    resources = build_definitions(settings).resources or {}
    assert resources["v3_source"].kind == "mysql"  # type: ignore[union-attr]


def test_prod_with_every_variable_loads() -> None:
    settings = resolve_settings(PROD_ENV)
    assert settings.environment is Environment.PROD
    assert settings.root("bronze") == "/opt/dagster/shared-data/bronze"
    defs = build_definitions(settings)
    # The password reaches the resource as an EnvVar, never as its value.
    source = (defs.resources or {})["v3_source"]
    assert "s3cret" not in repr(source)


@pytest.mark.parametrize("missing", sorted(k for k in PROD_ENV if k != "DATALAKE_ENV"))
def test_prod_missing_one_variable_fails_naming_it(missing: str) -> None:
    env = {k: v for k, v in PROD_ENV.items() if k != missing}
    with pytest.raises(SettingsError) as info:
        resolve_settings(env)
    assert set(info.value.problems) == {missing}
    assert missing in str(info.value)


def test_prod_with_nothing_set_names_every_required_variable() -> None:
    with pytest.raises(SettingsError) as info:
        resolve_settings({"DATALAKE_ENV": "prod"})
    assert set(info.value.problems) == set(PROD_ENV) - {"DATALAKE_ENV"}


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATALAKE_BATCH_SIZE", "lots"),
        ("DATALAKE_BATCH_SIZE", "0"),
        ("DATALAKE_BATCH_BYTES", "0"),
        ("DATALAKE_BATCH_BYTES", "32MB"),
        ("DATALAKE_TIMEZONE", "Mars/Olympus"),
        ("DATALAKE_PARTITION_START", "01/02/2024"),
        ("DATALAKE_PARTITION_START", "2099-01-01"),  # today's partition would not exist
        ("DATALAKE_EXTRACT_LAG_SECONDS", "-1"),
        ("DATALAKE_REGISTRY", "/no/such/registry.yaml"),
        ("DATALAKE_DUCKDB_MEMORY_LIMIT", "lots"),
        ("DATALAKE_DUCKDB_MEMORY_LIMIT", "2 gigs"),
        ("DATALAKE_DUCKDB_THREADS", "0"),
        ("DATALAKE_DUCKDB_TEMP_DIRECTORY", "spill"),
        ("DATALAKE_AZURE_DUCKDB_READER", "native"),
        ("DATALAKE_DUCKDB_REMOTE_THREADS", "-1"),
        ("DATALAKE_EXTRACT_LAG_SECONDS", "nan"),
        ("DATALAKE_EXTRACT_LAG_SECONDS", "inf"),
        ("DATALAKE_BRONZE_FRESHNESS_HOURS", "inf"),
        ("DATALAKE_BRONZE_FRESHNESS_HOURS", "nan"),
        ("DATALAKE_BRONZE_CRON", "every hour"),
        ("DATALAKE_DELETES_CRON", "61 2 * * *"),
        ("DATALAKE_SILVER_LATE_DAYS", "-1"),
        ("DATALAKE_EXTRACT_STREAMS", "0"),
        ("DATALAKE_EXTRACT_STREAMS", "17"),
        ("DATALAKE_EXTRACT_STREAM_MIN_ROWS", "-1"),
    ],
)
def test_invalid_values_are_named(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        resolve_settings({variable: value})
    assert set(info.value.problems) == {variable}


def test_a_port_out_of_range_is_named() -> None:
    env = {"DATALAKE_MYSQL_HOST": "db", "DATALAKE_MYSQL_USER": "reader", "DATALAKE_MYSQL_PORT": "70000"}
    with pytest.raises(SettingsError) as info:
        resolve_settings(env)
    assert set(info.value.problems) == {"DATALAKE_MYSQL_PORT"}
    assert resolve_settings({**env, "DATALAKE_MYSQL_PORT": "65535"}).source.mysql is not None


@pytest.mark.parametrize(
    ("root", "message"),
    [
        ("s3://bucket/lake", "unsupported storage root"),
        ("abfs://@acct.dfs.core.windows.net/lake", "names no container"),
        ("tmp/lake", "absolute path"),
        ("file://tmp/lake", "absolute path"),
        ("abfs://lake@acct.dfs.core.windows.net/silver?sv=2024&sig=abc", "query or fragment"),
        ("abfs://acct.dfs.core.windows.net/lake/silver", "is not a container name"),
        ("/srv/lake [prod]/silver", "glob character"),
        ("abfs://lake@acct.dfs.core.windows.net/br*", "glob character"),
        ("abfs://lake/silver", "without an account needs one"),
        # Blob names keep these literally: '//' was written and then refused by polars' reader.
        ("abfs://lake@acct.dfs.core.windows.net/lake//silver", "empty, '.' or '..' path segment"),
        ("abfs://lake@acct.dfs.core.windows.net/lake/./silver", "empty, '.' or '..' path segment"),
        ("az://lake@acct.dfs.core.windows.net/../silver", "empty, '.' or '..' path segment"),
    ],
)
def test_bad_storage_roots_are_named_when_settings_load(root: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        resolve_settings({"DATALAKE_ROOT_SILVER": root, "DATALAKE_AZURE_USE_DEFAULT_CREDENTIAL": "true"})
    assert set(info.value.problems) == {"DATALAKE_ROOT_SILVER"}
    assert message in info.value.problems["DATALAKE_ROOT_SILVER"]


@pytest.mark.parametrize(
    "root", ["/srv/lake/silver", "file:///srv/lake/silver", "abfs://lake@acct.dfs.core.windows.net/silver"]
)
def test_good_storage_roots_load(root: str) -> None:
    settings = resolve_settings(
        {"DATALAKE_ROOT_SILVER": root, "DATALAKE_AZURE_USE_DEFAULT_CREDENTIAL": "true"}
    )
    assert settings.root("silver") == root


@pytest.mark.parametrize(("value", "reader"), [(None, "arrow"), ("adlfs", "adlfs"), ("Arrow", "arrow")])
def test_duckdb_azure_reader_reaches_the_azure_resource(value: str | None, reader: str) -> None:
    from datalake.azure import azure_resource

    env = {"DATALAKE_ROOT_SILVER": "abfs://lake@acct.dfs.core.windows.net/silver"}
    env |= {"DATALAKE_AZURE_USE_DEFAULT_CREDENTIAL": "true"}
    settings = resolve_settings(env | ({"DATALAKE_AZURE_DUCKDB_READER": value} if value else {}))
    assert azure_resource(settings).duckdb_reader == reader


def test_unknown_environment_is_rejected() -> None:
    with pytest.raises(SettingsError, match="DATALAKE_ENV"):
        resolve_settings({"DATALAKE_ENV": "staging"})


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        # The portal's "Blob service SAS URL": the token must not sit in plain resource config.
        (
            {"DATALAKE_AZURE_BLOB_ENDPOINT": "https://acct.blob.core.windows.net/?sv=2024&sig=s3cr3t"},
            "without a query",
        ),
        ({"DATALAKE_AZURE_BLOB_ENDPOINT": "acct.blob.core.windows.net"}, "http(s) URL with a host"),
        (
            {
                "DATALAKE_AZURE_BLOB_ENDPOINT": "http://127.0.0.1:10000/devstoreaccount1",
                "DATALAKE_AZURE_USE_DEFAULT_CREDENTIAL": "true",
            },
            "needs an https endpoint",
        ),
    ],
)
def test_a_bad_blob_endpoint_is_named_when_settings_load_without_echoing_it(
    env: dict[str, str], problem: str
) -> None:
    base = {"DATALAKE_ROOT_SILVER": "abfs://lake/silver", "DATALAKE_AZURE_SAS_TOKEN": "sv=1&sig=x"}
    with pytest.raises(SettingsError) as info:
        resolve_settings(base | env)
    assert set(info.value.problems) == {"DATALAKE_AZURE_BLOB_ENDPOINT"}
    assert problem in info.value.problems["DATALAKE_AZURE_BLOB_ENDPOINT"]
    assert "s3cr3t" not in str(info.value)
    # With a good endpoint, the account-less root takes the endpoint's account.
    good = resolve_settings(
        base | {"DATALAKE_AZURE_BLOB_ENDPOINT": "http://127.0.0.1:10000/devstoreaccount1"}
    )
    assert good.root("silver") == "abfs://lake/silver"


def test_a_root_on_another_account_than_a_path_style_endpoint_serves_is_named() -> None:
    """The emulator's endpoint names its account in the path: a root on another account failed
    every write with an authorization error."""
    env = {
        "DATALAKE_AZURE_ACCOUNT_KEY": "a2V5",
        "DATALAKE_AZURE_BLOB_ENDPOINT": "http://127.0.0.1:10000/devstoreaccount1",
        "DATALAKE_ROOT_BRONZE": "abfs://lake@devstoreaccount1.dfs.core.windows.net/bronze",
        "DATALAKE_ROOT_SILVER": "abfs://lake@otheracct.dfs.core.windows.net/silver",
    }
    with pytest.raises(SettingsError) as info:
        resolve_settings(env)
    assert set(info.value.problems) == {"DATALAKE_ROOT_SILVER"}
    assert "serves account 'devstoreaccount1' only" in info.value.problems["DATALAKE_ROOT_SILVER"]
    resolve_settings({**env, "DATALAKE_ROOT_SILVER": "abfs://lake/silver"})  # the endpoint's account
    # A host-style endpoint (a sovereign cloud, a private link) is not compared.
    resolve_settings({**env, "DATALAKE_AZURE_BLOB_ENDPOINT": "https://blob.private.example"})


def test_azure_root_without_credentials_is_rejected() -> None:
    with pytest.raises(SettingsError) as info:
        resolve_settings({"DATALAKE_ROOT_SILVER": "abfs://lake@acct.dfs.core.windows.net/silver"})
    assert "DATALAKE_AZURE_ACCOUNT_KEY" in info.value.problems


_AZURE_PROBE = textwrap.dedent(
    """
    import json, sys
    from datalake.definitions import build_definitions
    from datalake.settings import resolve_settings

    resources = build_definitions(resolve_settings()).resources or {}
    managers = ["bronze_io_manager", "silver_io_manager", "revsci_io_manager", "duckdb_path_input_manager"]
    print(json.dumps({
        "azure_resource": type(resources["azure"]).__name__ if "azure" in resources else None,
        "managers": {k: type(resources[k].azure).__name__ for k in managers},
        "sdk_loaded": sorted(m for m in sys.modules if m.startswith(("azure.", "dagster_azure", "adlfs"))),
        "key_in_repr": "k3y-never-shown" in repr(resources),
    }))
    """
)


def test_azure_access_is_wired_only_where_a_root_is_on_azure() -> None:
    """Local/NFS roots: no Azure resource and no Azure SDK in the process (~40 MB, ~0.5 s saved in
    the code server and every run); one group on Azure: every lake IO manager gets the credentials."""
    local = run_cli(["-c", _AZURE_PROBE], clean_environ())
    assert local.returncode == 0, local.stderr
    found = json.loads(local.stdout.strip().splitlines()[-1])
    assert found["azure_resource"] is None and found["sdk_loaded"] == []
    assert set(found["managers"].values()) == {"NoneType"}

    env = {
        "DATALAKE_ROOT_SILVER": "abfs://lake@acct.dfs.core.windows.net/silver",
        "DATALAKE_AZURE_ACCOUNT_KEY": "k3y-never-shown",
    }
    on_azure = run_cli(["-c", _AZURE_PROBE], clean_environ(env))
    assert on_azure.returncode == 0, on_azure.stderr
    found = json.loads(on_azure.stdout.strip().splitlines()[-1])
    assert found["azure_resource"] == "AzureBlobResource"
    assert set(found["managers"].values()) == {"AzureBlobResource"}
    assert "azure.storage.blob" in found["sdk_loaded"] and not found["key_in_repr"]


def test_dagster_loads_the_module_in_local_and_refuses_prod_with_a_missing_variable(tmp_path: Path) -> None:
    """The real loader (`dagster definitions validate`), as `dagster dev` and the code server use it."""
    # An empty instance of its own: without DAGSTER_HOME, Dagster would read the repository's
    # production dagster.yaml (PostgreSQL) from the working directory.
    home = {"DAGSTER_HOME": str(tmp_path)}
    ok = run_cli(
        ["-m", "dagster", "definitions", "validate", "-m", "datalake.definitions"], clean_environ(home)
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    env = clean_environ({**home, **{k: v for k, v in PROD_ENV.items() if k != "DATALAKE_ROOT_SILVER"}})
    failed = run_cli(["-m", "dagster", "definitions", "validate", "-m", "datalake.definitions"], env)
    assert failed.returncode != 0
    assert "DATALAKE_ROOT_SILVER" in failed.stdout + failed.stderr
    assert "s3cret" not in failed.stdout + failed.stderr


_MYSQL = {"DATALAKE_MYSQL_HOST": "127.0.0.1", "DATALAKE_MYSQL_USER": "me"}


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"DATALAKE_MYSQL_SSL_MODE": "strict"}, "must be one of disabled, preferred"),
        ({"DATALAKE_MYSQL_SSL_MODE": "required", "DATALAKE_MYSQL_SSL_CA": "/ca.pem"}, "would be ignored"),
        (
            {
                "DATALAKE_MYSQL_SSL_MODE": "disabled",
                "DATALAKE_MYSQL_SSL_CERT": "/c.pem",
                "DATALAKE_MYSQL_SSL_KEY": "/k",
            },
            "cannot present the client certificate",
        ),
    ],
)
def test_bad_tls_settings_fail_at_load_naming_the_variable(env: dict[str, str], problem: str) -> None:
    with pytest.raises(SettingsError) as failure:
        resolve_settings({**_MYSQL, **env})
    assert failure.value.problems.keys() == {"DATALAKE_MYSQL_SSL_MODE"}
    assert problem in failure.value.problems["DATALAKE_MYSQL_SSL_MODE"]


@pytest.mark.parametrize(
    ("env", "mode"),
    [
        ({}, "preferred"),
        ({"DATALAKE_MYSQL_SSL_CA": "/ca.pem"}, "verify_identity"),
        ({"DATALAKE_MYSQL_SSL_CERT": "/c.pem", "DATALAKE_MYSQL_SSL_KEY": "/k.pem"}, "required"),
        ({"DATALAKE_MYSQL_SSL_MODE": "VERIFY-CA"}, "verify_ca"),
    ],
)
def test_tls_mode_defaults(env: dict[str, str], mode: str) -> None:
    settings = resolve_settings({**_MYSQL, **env})
    assert settings.source.mysql is not None
    assert settings.source.mysql.ssl_mode == mode


@pytest.mark.parametrize("limit", ["2GB", "512MiB", "1.5 GB", "300mb", "75%"])
def test_duckdb_settings_reach_the_resource_and_duckdb_accepts_them(limit: str, tmp_path: Path) -> None:
    """What the resolver accepts, DuckDB accepts too (a connection is opened with it)."""
    from datalake.lake import DuckDBResource

    settings = resolve_settings(
        {
            "DATALAKE_DUCKDB_MEMORY_LIMIT": limit,
            "DATALAKE_DUCKDB_THREADS": "1",
            "DATALAKE_DUCKDB_REMOTE_THREADS": "8",
            "DATALAKE_DUCKDB_TEMP_DIRECTORY": str(tmp_path / "spill"),
        }
    )
    resource = (build_definitions(settings).resources or {})["duckdb_resource"]
    assert isinstance(resource, DuckDBResource)
    assert (resource.memory_limit, resource.threads, resource.remote_threads, resource.temp_directory) == (
        limit,
        1,
        8,
        str(tmp_path / "spill"),
    )
    con = resource.connect()
    assert con.sql("SELECT current_setting('threads')").fetchall() == [(1,)]
    assert con.sql("SELECT current_setting('temp_directory')").fetchall() == [(str(tmp_path / "spill"),)]


def test_duckdb_spills_under_the_system_temp_directory_by_default() -> None:
    import tempfile

    settings = resolve_settings({})
    assert settings.duckdb.temp_directory == os.path.join(tempfile.gettempdir(), "datalake-duckdb")
    assert (settings.duckdb.memory_limit, settings.duckdb.threads, settings.duckdb.remote_threads) == (
        "2GB",
        None,
        16,
    )


def test_a_steps_first_duckdb_connection_is_prepared_while_the_step_starts(tmp_path: Path) -> None:
    """The database is created when the resource is set up (in the background); the step's first
    connect() takes it, with the resource's settings; later ones are new; an unused one is closed."""
    resource = DuckDBResource(memory_limit="512MiB", threads=1, temp_directory=str(tmp_path / "spill"))
    seen: dict[str, object] = {}

    @dg.asset
    def step(duckdb_resource: DuckDBResource) -> None:
        prepared = duckdb_resource._prepared  # pyright: ignore[reportPrivateUsage]
        seen["prepared"] = prepared is not None
        first, second = duckdb_resource.connect(), duckdb_resource.connect()
        seen["first_is_prepared"] = prepared is not None and first is prepared.result()
        seen["settings"] = [
            c.sql("SELECT current_setting('memory_limit'), current_setting('threads')").fetchall()[0]
            for c in (first, second)
        ]
        seen["distinct"] = first is not second

    assert dg.materialize([step], resources={"duckdb_resource": resource}).success
    assert seen["prepared"] and seen["first_is_prepared"] and seen["distinct"]
    assert seen["settings"] == [("512.0 MiB", 1), ("512.0 MiB", 1)]

    with dg.build_resources({"duckdb_resource": resource}) as built:  # set up, never used
        unused = built.duckdb_resource._prepared  # pyright: ignore[reportPrivateUsage]
        assert unused is not None
        connection = unused.result()
    with pytest.raises(Exception, match=r"(?i)closed"):
        connection.sql("SELECT 1")
