"""The production deployment, tested as deployed (minus the Docker engine, which this machine lacks).

* The code server runs the image's own command line — ENTRYPOINT + CMD parsed from the
  Dockerfile, only host and port substituted — from the environment the Dockerfile's build steps
  produce (``test_dockerfile.emulate_build``), with the image's ENV (``DATALAKE_ENV=prod``).
* The webserver and the daemon run from the same environment, each with a ``DAGSTER_HOME`` of its
  own holding the production ``dagster.yaml``, a workspace of ``deploy/workspace.yaml``'s shape,
  and only the DAGSTER_PG_* variables: they reach the code through gRPC, never by importing it.
* Everything persistent is in a real PostgreSQL (a database of this module's own on the session's
  server); the source is the demo V3 data in a real MariaDB.

Runs are launched the way the UI launches them: a GraphQL mutation against the webserver; the
QueuedRunCoordinator queues them, the daemon dequeues them, and the code server starts the run
worker (DefaultRunLauncher).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg2
import pytest
import sqlalchemy as sa
import yaml

from datalake.definitions import BRONZE_JOB, SILVER_JOB, build_definitions
from datalake.settings import resolve_settings
from datalake_tests.helpers import PROD_ENV, REPO
from datalake_tests.services import (
    LOOPBACK,
    DagsterProcess,
    MariaDBServer,
    PostgresServer,
    code_server_ready,
    free_port,
    grpc_health_check,
    http_get_ok,
    postgres_bindir,
    start_dagster_process,
    stop_process,
)
from datalake_tests.test_dockerfile import (
    DOCUMENTED_CMD,
    EmulatedImage,
    container_command,
    dockerfile,
    emulate_build,
    image_environ,
)

pytestmark = [pytest.mark.postgres, pytest.mark.mariadb]

LOCATION = "datalake"
WORKSPACE = REPO / "deploy" / "workspace.yaml"
DEPLOY_README = REPO / "deploy" / "README.md"
PG_DATABASE = "dagster_deploy_test"
PG_RESTORED = "dagster_deploy_restored"
RUN_TIMEOUT_S = 240.0
# Steps run inside the run worker. With the default multiprocess executor every step is a fresh
# Python process importing Dagster and the definitions (~6 s each on the 2-core machine, over a
# minute per bronze run); the launch path, the pool slots and the watermark reads are the same.
# Operators can pick it as well, in the launchpad: execution: {config: {in_process: {}}}.
IN_PROCESS: dict[str, Any] = {"execution": {"config": {"in_process": {}}}}


# ---------------------------------------------------------------- helpers


def code_server_argv(port: int) -> list[str]:
    """ENTRYPOINT + CMD of the image, with only the bind host and the port replaced."""
    command = container_command()
    cmd = dockerfile()[-1].last("CMD").exec_form()
    entrypoint = command[: len(command) - len(cmd)]
    substituted = list(cmd)
    substituted[cmd.index("-h") + 1] = LOOPBACK
    substituted[cmd.index("-p") + 1] = str(port)
    return [*entrypoint, *substituted]


def workspace_for(port: int, target: Path) -> Path:
    """deploy/workspace.yaml with the code server's host and port replaced (nothing else)."""
    workspace = yaml.safe_load(WORKSPACE.read_text())
    (entry,) = workspace["load_from"]
    entry["grpc_server"].update(host=LOOPBACK, port=port)
    target.write_text(yaml.safe_dump(workspace))
    return target


def production_config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "dagster.yaml").read_text())


def dagster_home(image: EmulatedImage, target: Path) -> Path:
    """A fresh DAGSTER_HOME with the image's production dagster.yaml (one per process, as per container)."""
    target.mkdir(parents=True)
    shutil.copy2(Path(image.env["DAGSTER_HOME"]) / "dagster.yaml", target / "dagster.yaml")
    return target


class GraphQLError(AssertionError):
    pass


def graphql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.load(response)
    if payload.get("errors"):
        raise GraphQLError(json.dumps(payload["errors"], indent=1))
    return payload["data"]


ENTRY_FRAGMENT = """
fragment Entry on MetadataEntry {
  label
  ... on TextMetadataEntry { text }
  ... on IntMetadataEntry { intValue }
}
"""


def entry_value(entry: dict[str, Any]) -> Any:
    return entry.get("intValue", entry.get("text"))


@dataclass
class Stack:
    """Code server + webserver + daemon on one PostgreSQL instance."""

    image: EmulatedImage
    root: Path
    pg_env: dict[str, str]
    code_env: dict[str, str]
    code_port: int
    code_server: DagsterProcess | None = None
    webserver: DagsterProcess | None = None
    daemon: DagsterProcess | None = None
    restarts: int = 0
    # Every process this stack started, for the teardown (stopping twice is a no-op).
    started: list[DagsterProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.webserver is not None
        return f"http://{LOOPBACK}:{self.webserver.port}"

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        return graphql(self.url, query, variables)

    def health_check(self) -> None:
        grpc_health_check(self.image.bin / "dagster", self.code_port, env=self.code_env)

    def start_code_server(self) -> DagsterProcess:
        self.restarts += 1
        workdir = self.root / f"code-server-{self.restarts}"
        shutil.copytree(self.image.workdir, workdir)  # the image's (empty) WORKDIR
        self.code_server = start_dagster_process(
            code_server_argv(self.code_port),
            env=self.code_env,
            cwd=workdir,
            log_path=self.root / f"code-server-{self.restarts}.log",
            what="dagster code server",
            # The port opens once the definitions are loaded; then the image's health check must pass.
            ready=lambda: code_server_ready(self.image.bin / "dagster", self.code_port, env=self.code_env),
            port=self.code_port,
        )
        self.started.append(self.code_server)
        return self.code_server

    def stop_code_server(self) -> None:
        assert self.code_server is not None
        self.code_server.stop(timeout=60)
        self.code_server = None

    def launch(self, job: str, *, partition: str | None = None) -> str:
        tags = [{"key": "dagster/partition", "value": partition}] if partition else []
        data = self.graphql(
            """
            mutation Launch($params: ExecutionParams!) {
              launchRun(executionParams: $params) {
                __typename
                ... on LaunchRunSuccess { run { runId } }
                ... on PythonError { message stack }
                ... on RunConfigValidationInvalid { errors { message } }
                ... on InvalidSubsetError { message }
              }
            }
            """,
            {
                "params": {
                    "selector": {
                        "repositoryLocationName": LOCATION,
                        "repositoryName": "__repository__",
                        "jobName": job,
                    },
                    "runConfigData": IN_PROCESS,
                    "executionMetadata": {"tags": tags},
                }
            },
        )["launchRun"]
        assert data["__typename"] == "LaunchRunSuccess", data
        return data["run"]["runId"]

    def wait(self, run_id: str, timeout: float = RUN_TIMEOUT_S) -> FinishedRun:
        """Poll the run until it ends; a failure carries the run's error messages."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.graphql(
                """
                query Run($id: ID!) {
                  runOrError(runId: $id) {
                    ... on Run {
                      status
                      tags { key value }
                      assetMaterializations {
                        assetKey { path }
                        metadataEntries { ...Entry }
                      }
                    }
                  }
                }
                """
                + ENTRY_FRAGMENT,
                {"id": run_id},
            )["runOrError"]
            if run["status"] in {"SUCCESS", "FAILURE", "CANCELED"}:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"run {run_id} still {run['status']} after {timeout:.0f}s")
            time.sleep(0.5)
        events = self.graphql(
            """
            query Logs($id: ID!) {
              logsForRun(runId: $id) {
                ... on EventConnection { events { __typename ... on MessageEvent { message level } } }
              }
            }
            """,
            {"id": run_id},
        )["logsForRun"]["events"]
        if run["status"] != "SUCCESS":
            errors = [e["message"] for e in events if e.get("level") in {"ERROR", "CRITICAL"}]
            pytest.fail(f"run {run_id} ended {run['status']}:\n" + "\n".join(errors))
        return FinishedRun(
            run_id=run_id,
            tags={t["key"]: t["value"] for t in run["tags"]},
            event_types=[e["__typename"] for e in events],
            metadata={
                "/".join(m["assetKey"]["path"]): {e["label"]: entry_value(e) for e in m["metadataEntries"]}
                for m in run["assetMaterializations"]
            },
        )

    def run(self, job: str, *, partition: str | None = None) -> FinishedRun:
        """Launch through the webserver (as the UI does) and wait for the run to succeed."""
        return self.wait(self.launch(job, partition=partition))


@dataclass(frozen=True)
class FinishedRun:
    run_id: str
    tags: dict[str, str]
    event_types: list[str]  # GraphQL event type names, in order
    metadata: dict[str, dict[str, Any]]  # asset key -> metadata of its materialization in this run

    def __getitem__(self, asset: str) -> dict[str, Any]:
        return self.metadata[asset]


def readme_block(language: str) -> str:
    """The one ```<language> block of deploy/README.md (the watermark queries operators are given)."""
    blocks = re.findall(rf"```{language}\n(.*?)```", DEPLOY_README.read_text(), flags=re.S)
    assert len(blocks) == 1, f"deploy/README.md: expected exactly one ```{language} block"
    return blocks[0]


def readme_sql_watermark(pg_env: dict[str, str], database: str | None = None) -> str | None:
    """The README's SQL for the current watermark of bronze/billing_cdr, run on PostgreSQL."""
    with (
        psycopg2.connect(
            host=pg_env["DAGSTER_PG_HOST"],
            port=int(pg_env["DAGSTER_PG_PORT"]),
            dbname=database or pg_env["DAGSTER_PG_DB"],
            user=pg_env["DAGSTER_PG_USER"],
            password=pg_env["DAGSTER_PG_PASSWORD"],
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute(readme_block("sql"))
        row = cur.fetchone()
    return None if row is None else str(row[0])


def readme_graphql_watermark(stack: Stack) -> str | None:
    """The README's GraphQL query: the newest materialization with a watermark entry holds it."""
    asset = stack.graphql(readme_block("graphql"))["assetOrError"]
    for materialization in asset["assetMaterializations"]:
        for entry in materialization["metadataEntries"]:
            if entry["label"] == "datalake/watermark":
                return entry["text"]
    return None


def pg_superuser(server: PostgresServer) -> Any:
    """The cluster's superuser over its private socket (trust auth), in autocommit mode."""
    conn = psycopg2.connect(host=str(server.socket_dir), port=server.port, user="postgres", dbname="postgres")
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    return conn


def recreate_database(server: PostgresServer, name: str) -> None:
    conn = pg_superuser(server)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            cur.execute(f"CREATE DATABASE {name} OWNER {server.user}")
    finally:
        conn.close()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def deployed_image(tmp_path_factory: pytest.TempPathFactory) -> EmulatedImage:
    """The image's environment, built by the Dockerfile's own steps (see test_dockerfile.py)."""
    return emulate_build(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def dagster_pg(postgres_server: PostgresServer) -> Iterator[dict[str, str]]:
    """DAGSTER_PG_* for a database of this module's own, owned by the unprivileged user."""
    recreate_database(postgres_server, PG_DATABASE)
    yield {
        "DAGSTER_PG_HOST": postgres_server.host,
        "DAGSTER_PG_PORT": str(postgres_server.port),
        "DAGSTER_PG_DB": PG_DATABASE,
        "DAGSTER_PG_USER": postgres_server.user,
        "DAGSTER_PG_PASSWORD": postgres_server.password,
    }


@pytest.fixture(scope="module")
def lake_settings(mariadb_server: MariaDBServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every production DATALAKE_* variable except DATALAKE_ENV, which the image sets to prod."""
    lake = tmp_path_factory.mktemp("lake")
    return {
        "DATALAKE_MYSQL_HOST": mariadb_server.host,
        "DATALAKE_MYSQL_PORT": str(mariadb_server.port),
        # The read-only user: production extracts with SELECT (and PROCESS) only.
        "DATALAKE_MYSQL_USER": mariadb_server.ro_user,
        "DATALAKE_MYSQL_PASSWORD": mariadb_server.ro_password,
        "DATALAKE_ROOT_BRONZE": str(lake / "bronze"),
        "DATALAKE_ROOT_SILVER": str(lake / "silver"),
        "DATALAKE_ROOT_VANGUARD_WHOLESALE": str(lake / "vanguard_wholesale"),
        "DATALAKE_PARTITION_START": (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=30)).isoformat(),
        "DATALAKE_EXTRACT_LAG_SECONDS": "0",
        # The test launches every run itself: no schedule or automation run may interleave.
        "DATALAKE_AUTOMATION": "stopped",
    }


@pytest.fixture(scope="module")
def stack(
    deployed_image: EmulatedImage,
    dagster_pg: dict[str, str],
    lake_settings: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    image = deployed_image
    root = tmp_path_factory.mktemp("stack")
    code_port = free_port()
    workspace = workspace_for(code_port, root / "workspace.yaml")
    code_env = image_environ(
        image,
        {"DAGSTER_HOME": str(dagster_home(image, root / "home-code-server")), **dagster_pg, **lake_settings},
    )

    def control_env(name: str) -> dict[str, str]:
        # Webserver and daemon: the instance, nothing of the datalake (no settings, no secrets).
        return image_environ(
            image, {"DAGSTER_HOME": str(dagster_home(image, root / f"home-{name}")), **dagster_pg}
        )

    stack_ = Stack(image=image, root=root, pg_env=dagster_pg, code_env=code_env, code_port=code_port)
    try:
        # In deployment order: the code server first, then the processes that load it over gRPC.
        stack_.start_code_server()
        web_port = free_port()
        (root / "webserver").mkdir()
        stack_.webserver = start_dagster_process(
            [str(image.bin / "dagster-webserver"), "-h", LOOPBACK, "-p", str(web_port), "-w", str(workspace)],
            env=control_env("webserver"),
            cwd=root / "webserver",
            log_path=root / "webserver.log",
            what="dagster-webserver",
            ready=lambda: http_get_ok(f"http://{LOOPBACK}:{web_port}/server_info"),
            port=web_port,
        )
        stack_.started.append(stack_.webserver)
        (root / "daemon").mkdir()
        stack_.daemon = start_dagster_process(
            [str(image.bin / "dagster-daemon"), "run", "-w", str(workspace)],
            env=control_env("daemon"),
            cwd=root / "daemon",
            log_path=root / "daemon.log",
            what="dagster-daemon",
            # Started is enough; the tests wait on what the daemon does (dequeuing their runs).
            ready=lambda: None,
        )
        stack_.started.append(stack_.daemon)
        yield stack_
    finally:
        # By PID, each process this stack started; a code server's run workers share its process group.
        for process in stack_.started:
            process.stop(timeout=30)


# ---------------------------------------------------------------- tests


def test_image_command_serves_every_asset_to_the_webserver(
    stack: Stack, lake_settings: dict[str, str]
) -> None:
    assert stack.code_server is not None
    argv = stack.code_server.argv
    assert argv[-len(DOCUMENTED_CMD) :] == [
        *DOCUMENTED_CMD[:4],
        LOOPBACK,
        DOCUMENTED_CMD[5],
        str(stack.code_port),
        *DOCUMENTED_CMD[7:],
    ]
    # `dagster api grpc-health-check`, the image's HEALTHCHECK, against the running server.
    stack.health_check()

    data = stack.graphql(
        """
        {
          workspaceOrError { ... on Workspace { locationEntries {
            name loadStatus
            locationOrLoadError { __typename ... on PythonError { message } }
          } } }
          assetNodes { assetKey { path } }
          shouldShowNux
          instance {
            runQueuingSupported
            runQueueConfig { maxConcurrentRuns tagConcurrencyLimitsYaml }
            poolConfig { poolGranularity defaultPoolLimit }
          }
        }
        """
    )
    (entry,) = data["workspaceOrError"]["locationEntries"]
    assert entry["name"] == LOCATION
    assert entry["loadStatus"] == "LOADED"
    assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation", entry
    served = {"/".join(node["assetKey"]["path"]) for node in data["assetNodes"]}
    # The same settings, resolved in this process, must give the same asset graph.
    expected = {
        key.to_user_string()
        for key in build_definitions(
            resolve_settings({"DATALAKE_ENV": "prod", **lake_settings})
        ).resolve_all_asset_keys()
    }
    assert served == expected
    assert {"bronze/billing_cdr", "silver/fact_invoice", "revsci/billing_usage_aggregated"} <= served

    # The production instance as the webserver sees it: queue, limits, no welcome modal.
    assert data["shouldShowNux"] is False
    instance = data["instance"]
    assert instance["runQueuingSupported"] is True
    runs = production_config()["concurrency"]["runs"]
    assert instance["runQueueConfig"]["maxConcurrentRuns"] == runs["max_concurrent_runs"]
    assert (
        yaml.safe_load(instance["runQueueConfig"]["tagConcurrencyLimitsYaml"])
        == runs["tag_concurrency_limits"]
    )
    assert instance["poolConfig"]["poolGranularity"] == "op"


def test_missing_production_variables_refuse_to_start(deployed_image: EmulatedImage, tmp_path: Path) -> None:
    """The image's command, missing two prod variables: exits non-zero naming them, never a secret."""
    secrets = {
        "DATALAKE_MYSQL_PASSWORD": "pw-must-not-leak-7f3a",
        "DATALAKE_AZURE_ACCOUNT_KEY": "key-must-not-leak-9c1b",
    }
    env_vars = {
        k: v
        for k, v in PROD_ENV.items()
        if k not in {"DATALAKE_ENV", "DATALAKE_ROOT_SILVER", "DATALAKE_MYSQL_HOST"}
    }
    image = deployed_image
    home = dagster_home(image, tmp_path / "home")
    # No DATALAKE_ENV: the image's own ENV makes it prod.
    env = image_environ(image, {**env_vars, **secrets, "DAGSTER_HOME": str(home)})
    assert env["DATALAKE_ENV"] == "prod"
    port = free_port()
    log_path = tmp_path / "code-server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            code_server_argv(port),
            env=env,
            cwd=image.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        returncode = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        stop_process(process.pid, process=process, timeout=30)
    output = log_path.read_text()
    assert returncode is not None, f"the code server kept running with missing settings:\n{output[-3000:]}"
    assert returncode != 0, output
    assert "DATALAKE_ROOT_SILVER" in output and "DATALAKE_MYSQL_HOST" in output, output
    assert "DATALAKE_ROOT_BRONZE" not in output, "only the missing variables are named"
    for value in secrets.values():
        assert value not in output
    # Nothing is listening: the image's health check fails.
    with pytest.raises(RuntimeError, match="grpc-health-check exited"):
        grpc_health_check(image.bin / "dagster", port, env=env)


def test_the_image_refuses_local_mode_unless_asked(deployed_image: EmulatedImage, tmp_path: Path) -> None:
    """An env file made from .env.example says DATALAKE_ENV=local and overrides the image's prod:
    the entrypoint refuses that (schedules stopped, settings defaulted), unless asked for it."""
    image = deployed_image
    example = {k: v for k, v in _env_file((REPO / ".env.example").read_text()).items() if v}
    env = image_environ(image, {**example, "DAGSTER_HOME": str(dagster_home(image, tmp_path / "home"))})
    assert env["DATALAKE_ENV"] == "local"
    entrypoint = [str(image.bin / "python"), "-m", "datalake.preflight"]
    refused = subprocess.run(
        [*entrypoint, "true"], env=env, cwd=image.workdir, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0
    assert "DATALAKE_ENV is 'local'" in refused.stderr and "DATALAKE_ALLOW_LOCAL=1" in refused.stderr
    pg = dict.fromkeys(("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD"), "set")  # the instance's
    allowed = subprocess.run(
        [*entrypoint, "true"],
        env={**env, **pg, "DATALAKE_ALLOW_LOCAL": "1"},
        cwd=image.workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert allowed.returncode == 0, allowed.stderr


def test_the_entrypoint_refuses_a_broken_registry_and_unset_instance_variables(tmp_path: Path) -> None:
    """A code server whose registry fails to load, or whose instance lacks a DAGSTER_PG_* variable,
    kept serving and passed its health check; the entrypoint refuses both, naming what is wrong."""
    import sys

    from datalake_tests.helpers import clean_environ

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    pg = {
        "DAGSTER_PG_HOST": "db.internal",
        "DAGSTER_PG_PORT": "5432",
        "DAGSTER_PG_DB": "dagster",
        "DAGSTER_PG_USER": "dagster",
        "DAGSTER_PG_PASSWORD": "pg-secret-never-shown",
    }
    base = clean_environ({**PROD_ENV, "DAGSTER_HOME": str(home)})
    for name in pg:
        base.pop(name, None)

    def preflight(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "datalake.preflight", "true"],
            env={**base, **extra},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    missing = preflight({"DAGSTER_PG_HOST": "db.internal", "DAGSTER_PG_PASSWORD": pg["DAGSTER_PG_PASSWORD"]})
    assert missing.returncode != 0
    assert "reads DAGSTER_PG_PORT, DAGSTER_PG_DB, DAGSTER_PG_USER, which are not set" in missing.stderr
    assert preflight(pg).returncode == 0
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        "tables:\n  - {schema: v3, table: t, primay_key: [id], cursor: {column: updated_at}}\n"
    )
    broken = preflight({**pg, "DATALAKE_REGISTRY": str(registry)})
    assert broken.returncode != 0
    assert "refusing to start" in broken.stderr and "primay_key" in broken.stderr, broken.stderr
    for result in (missing, broken):
        assert pg["DAGSTER_PG_PASSWORD"] not in result.stdout + result.stderr


def test_production_instance_on_postgres(
    deployed_image: EmulatedImage,
    dagster_pg: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = deployed_image
    for name, value in dagster_pg.items():
        monkeypatch.setenv(name, value)
    home = dagster_home(image, tmp_path / "home")
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        # A real round trip through PostgreSQL (psycopg2, per the scheme in dagster.yaml).
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert instance.get_runs_count() >= 0
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        # The `concurrency` block is in force (not shadowed by run_coordinator config).
        configured = production_config()["concurrency"]
        concurrency = instance.get_concurrency_config()
        queue = concurrency.run_queue_config
        assert queue is not None
        assert queue.max_concurrent_runs == configured["runs"]["max_concurrent_runs"]
        assert concurrency.pool_config.default_pool_limit == configured["pools"]["default_limit"]
        # Every tag bronze_job runs carry is limited: that is what bounds MySQL sessions per run.
        bronze_tags = build_definitions(resolve_settings(PROD_ENV)).resolve_job_def(BRONZE_JOB).tags
        assert bronze_tags
        for key, value in bronze_tags.items():
            assert any(
                limit["key"] == key and limit.get("value") == value and limit["limit"] >= 1
                for limit in queue.tag_concurrency_limits
            ), (key, value)
        assert instance.telemetry_enabled is False
        assert instance.nux_enabled is False
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
    finally:
        instance.dispose()

    # The pool command the README gives operators, against this instance, for the pool bronze uses.
    assert resolve_settings(PROD_ENV).v3_pool == "v3_mysql"
    set_pool = subprocess.run(
        [str(image.bin / "dagster"), "instance", "concurrency", "set", "v3_mysql", "3"],
        env=image_environ(image, {"DAGSTER_HOME": str(home), **dagster_pg}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert set_pool.returncode == 0, set_pool.stdout + set_pool.stderr
    with dg.DagsterInstance.from_config(str(home)) as reread:
        assert reread.event_log_storage.get_concurrency_info("v3_mysql").slot_count == 3

    # SQLAlchemy 2.1 + a bare `postgresql` scheme picks psycopg 3, which is not installed: the
    # reason dagster.yaml names psycopg2. Should this ever load, the comment there is stale.
    bare = tmp_path / "bare-scheme"
    bare.mkdir()
    (bare / "dagster.yaml").write_text(
        (home / "dagster.yaml").read_text().replace("scheme: postgresql+psycopg2", "scheme: postgresql")
    )
    with pytest.raises(ModuleNotFoundError, match="psycopg"):
        dg.DagsterInstance.from_config(str(bare))


def test_run_launcher_blocks_fit_the_instance_schema(tmp_path: Path) -> None:
    """deploy/run-launcher-*.yaml merged into dagster.yaml still validate as an instance config.

    The launcher classes themselves (dagster-docker, dagster-k8s) are not installed here; their own
    config keys were checked against those packages' schemas when the files were written.
    """
    from dagster._core.instance.config import dagster_instance_config

    for name in ("run-launcher-docker.yaml", "run-launcher-k8s.yaml"):
        block = yaml.safe_load((REPO / "deploy" / name).read_text())
        assert set(block) == {"run_launcher"}
        assert block["run_launcher"]["module"] in {"dagster_docker", "dagster_k8s"}
        merged = {**yaml.safe_load((REPO / "dagster.yaml").read_text()), **block}
        target = tmp_path / name.removesuffix(".yaml")
        target.mkdir()
        (target / "dagster.yaml").write_text(yaml.safe_dump(merged))
        config, _ = dagster_instance_config(str(target))
        assert config["run_launcher"]["class"] in {"DockerRunLauncher", "K8sRunLauncher"}


def _env_file(text: str) -> dict[str, str]:
    """NAME=value lines, as Docker's --env-file reads them (comments and blanks skipped)."""
    return dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z][A-Z0-9_]*=", line))


def test_production_queue_holds_runs_that_would_only_wait_on_the_v3_pool(tmp_path: Path) -> None:
    """What bounds a UI backfill of bronze (the asset job, without bronze_job's run tag): the
    production instance blocks runs whose steps all wait on a full pool, with no runs ahead."""
    config = production_config()
    config["storage"] = {"sqlite": {"base_dir": str(tmp_path / "storage")}}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        concurrency = instance.get_concurrency_config()
        queue = concurrency.run_queue_config
        assert queue is not None and queue.should_block_op_concurrency_limited_runs
        assert queue.op_concurrency_slot_buffer == 0
        assert concurrency.pool_config.pool_granularity is not None
        assert concurrency.pool_config.pool_granularity.value == "op"
        assert concurrency.pool_config.default_pool_limit == config["concurrency"]["pools"]["default_limit"]


def test_env_example_does_not_blank_dagster_home() -> None:
    """A copy of .env.example is `make dev`'s .env and the base of a deployment's env file: an
    empty DAGSTER_HOME there overrides the Makefile's and the image's."""
    from dotenv import dotenv_values

    example = REPO / ".env.example"
    assert "DAGSTER_HOME" not in dotenv_values(example)  # as dagster dev reads .env
    assert "DAGSTER_HOME" not in _env_file(example.read_text())  # as docker --env-file reads it


def test_docker_run_launcher_forwards_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run container has only the forwarded names and the image's ENV: every setting the code
    location reads must be forwarded, and dagster-docker's own resolution of the names must succeed
    with the env file made from .env.example (it refuses a listed name that is not set at all)."""
    from dagster._core.utils import parse_env_var

    from datalake.settings import GROUPS

    source = (REPO / "datalake" / "settings.py").read_text()
    read = set(re.findall(r'"(DATALAKE_[A-Z0-9_]*[A-Z0-9])"', source)) | {
        f"DATALAKE_ROOT_{g.upper()}" for g in GROUPS
    }
    settings = {name for name in read if not name.startswith("DATALAKE_DEMO_")}  # local demo only
    assert {"DATALAKE_TIMEZONE", "DATALAKE_AZURE_SAS_TOKEN", "DATALAKE_ROOT_BRONZE"} <= settings
    example = _env_file((REPO / ".env.example").read_text())
    assert read <= set(example), sorted(read - set(example))  # .env.example documents every one

    block = yaml.safe_load((REPO / "deploy" / "run-launcher-docker.yaml").read_text())
    forwarded = block["run_launcher"]["config"]["env_vars"]
    missing = settings | {n for n in example if n.startswith("DAGSTER_PG_")}
    assert not missing - set(forwarded), sorted(missing - set(forwarded))

    for name in [n for n in os.environ if n.startswith(("DATALAKE_", "DAGSTER_"))]:
        monkeypatch.delenv(name)
    for name, value in example.items():
        monkeypatch.setenv(name, value)
    container = dict(parse_env_var(name) for name in forwarded)  # what the run container gets
    assert container["DATALAKE_MYSQL_SSL_CA"] == ""  # empty: unset to the code location
    monkeypatch.delenv("DATALAKE_MYSQL_SSL_CA")
    with pytest.raises(Exception, match="DATALAKE_MYSQL_SSL_CA"):
        dict(parse_env_var(name) for name in forwarded)


def _insert_cdrs(engine: sa.Engine, rows: int) -> None:
    """New calls on the source: copies of the first ``rows`` CDRs with fresh ids and creation times."""
    from datalake.demo.schema import billing_cdr

    columns = [c for c in billing_cdr.columns if c.name not in {"cdr_id", "created_at"}]
    source = sa.select(*columns, sa.func.now().label("created_at")).order_by(billing_cdr.c.cdr_id).limit(rows)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(billing_cdr).from_select(
                [*(c.name for c in columns), "created_at"], source.subquery().select()
            )
        )


def test_runs_through_the_code_server_keep_the_watermark_in_postgres(
    stack: Stack, v3_mariadb: Callable[..., sa.Engine], postgres_server: PostgresServer, tmp_path: Path
) -> None:
    today = dt.datetime.now(dt.UTC).date().isoformat()
    source = v3_mariadb(cdr_rows=1_500, anchor=dt.datetime.combine(dt.date.fromisoformat(today), dt.time()))
    with source.connect() as conn:
        cdrs = conn.execute(sa.text("SELECT COUNT(*) FROM v3_billing.billing_cdr")).scalar_one()
        invoices = conn.execute(sa.text("SELECT COUNT(*) FROM v3_billing.invoice")).scalar_one()

    def committed_watermark() -> str | None:
        return readme_sql_watermark(stack.pg_env)

    assert committed_watermark() is None
    # 1. Today's incremental run, through webserver -> queue -> daemon -> code server -> run worker.
    first = stack.run(BRONZE_JOB, partition=today)
    # It went through the queue (QueuedRunCoordinator + daemon) with the tag its limit keys on.
    assert "RunEnqueuedEvent" in first.event_types
    assert first.tags["datalake/source"] == "v3"
    assert first.tags["dagster/partition"] == today
    cdr1 = first["bronze/billing_cdr"]
    assert cdr1["dagster/row_count"] == cdrs
    watermark1 = cdr1["datalake/watermark"]
    assert committed_watermark() == watermark1

    # 2. Nothing new on the source: 0 rows, read from the watermark the first run committed.
    second = stack.run(BRONZE_JOB, partition=today)
    cdr2 = second["bronze/billing_cdr"]
    assert cdr2["dagster/row_count"] == 0
    assert cdr2["datalake/window_lo"] == watermark1
    watermark2 = cdr2["datalake/watermark"]

    # Silver through the same path, over the bronze files both runs wrote.
    downstream = stack.run(SILVER_JOB)
    assert downstream["silver/fact_invoice"]["dagster/row_count"] == invoices
    assert "silver/invoice_current" in downstream.metadata

    # 3. Restart the code server (as an upgrade or a crash would): the state is not in it.
    first_pid = stack.code_server.pid if stack.code_server else None
    stack.stop_code_server()
    with pytest.raises(RuntimeError, match="grpc-health-check exited"):
        stack.health_check()
    restarted = stack.start_code_server()
    assert restarted.pid != first_pid
    _insert_cdrs(source, 25)
    third = stack.run(BRONZE_JOB, partition=today)
    cdr3 = third["bronze/billing_cdr"]
    assert cdr3["datalake/window_lo"] == watermark2
    assert cdr3["dagster/row_count"] == 25
    assert int(cdr3["datalake/watermark"]) > int(watermark2)
    assert committed_watermark() == cdr3["datalake/watermark"]
    assert readme_graphql_watermark(stack) == cdr3["datalake/watermark"]

    # 4. The README's backup: pg_dump of the instance database, restored elsewhere, keeps it.
    pg = stack.pg_env
    tools = postgres_bindir()
    client_env = {"PATH": os.environ.get("PATH", ""), "PGPASSWORD": pg["DAGSTER_PG_PASSWORD"]}
    connection = [
        "--host",
        pg["DAGSTER_PG_HOST"],
        "--port",
        pg["DAGSTER_PG_PORT"],
        "--username",
        pg["DAGSTER_PG_USER"],
    ]
    dump = tmp_path / "dagster.dump"
    subprocess.run(
        [str(tools / "pg_dump"), "--format=custom", *connection, "--file", str(dump), pg["DAGSTER_PG_DB"]],
        env=client_env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    recreate_database(postgres_server, PG_RESTORED)
    subprocess.run(
        [str(tools / "pg_restore"), "--no-owner", *connection, "--dbname", PG_RESTORED, str(dump)],
        env=client_env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert readme_sql_watermark(pg, database=PG_RESTORED) == cdr3["datalake/watermark"]
