"""The one environment resolver.

Nothing else in the code location reads environment variables: every setting — the
source connection, the storage root of each asset group, partitioning, extraction
lag and batch sizes — is derived here from ``DATALAKE_ENV`` (``local`` by default,
or ``prod``) and the variables listed in ``.env.example``.

Secrets are never read here: they are handed to resources as ``dg.EnvVar`` so they
are resolved at run launch and masked in the UI. The resolver only checks that
they are *present* where they are required.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from datalake.storage import StorageRoot

# Asset groups. Each group has its own storage root.
BRONZE = "bronze"
SILVER = "silver"
VANGUARD_WHOLESALE = "vanguard_wholesale"
GROUPS: tuple[str, ...] = (BRONZE, SILVER, VANGUARD_WHOLESALE)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REGISTRY = Path(__file__).resolve().parent / "registry.yaml"

# Names of the secret variables: resources receive dg.EnvVar(name), never the value.
MYSQL_PASSWORD_VAR = "DATALAKE_MYSQL_PASSWORD"
AZURE_ACCOUNT_KEY_VAR = "DATALAKE_AZURE_ACCOUNT_KEY"
AZURE_SAS_TOKEN_VAR = "DATALAKE_AZURE_SAS_TOKEN"
AZURE_BLOB_ENDPOINT_VAR = "DATALAKE_AZURE_BLOB_ENDPOINT"
AZURE_DUCKDB_READER_VAR = "DATALAKE_AZURE_DUCKDB_READER"
# How DuckDB reads Azure roots: Arrow's C++ Azure client, or adlfs (the Azure Python SDK).
DUCKDB_READERS = ("arrow", "adlfs")


class Environment(StrEnum):
    LOCAL = "local"
    PROD = "prod"


SSL_MODES = ("disabled", "preferred", "required", "verify_ca", "verify_identity")
VERIFYING_MODES = ("verify_ca", "verify_identity")


def resolve_ssl_mode(mode: str | None, ca: str | None, cert: str | None) -> str:
    """The TLS mode in effect: ``mode`` checked against the files given, or its default.

    Without a mode: ``verify_identity`` with a CA, ``required`` with a client certificate,
    else ``preferred``. A CA only means something to a verifying mode, and a client
    certificate needs TLS: other combinations are errors rather than silently ignored files.
    """
    if mode is None:
        return "verify_identity" if ca else "required" if cert else "preferred"
    normalized = mode.strip().lower().replace("-", "_")
    if normalized not in SSL_MODES:
        raise ValueError(f"must be one of {', '.join(SSL_MODES)}, got {mode!r}")
    if ca and normalized not in VERIFYING_MODES:
        raise ValueError(
            f"{normalized!r} does not verify the server, so DATALAKE_MYSQL_SSL_CA would be ignored: "
            "use verify_ca or verify_identity"
        )
    if cert and normalized == "disabled":
        raise ValueError(
            "'disabled' cannot present the client certificate: use required, verify_ca or verify_identity"
        )
    return normalized


class SettingsError(ValueError):
    """Raised when the environment cannot produce valid settings; names every bad variable."""

    def __init__(self, environment: str, problems: Mapping[str, str]):
        self.problems = dict(problems)
        lines = "\n".join(f"  - {var}: {why}" for var, why in sorted(self.problems.items()))
        super().__init__(
            f"DATALAKE_ENV={environment}: {len(self.problems)} setting(s) missing or invalid "
            f"({', '.join(sorted(self.problems))}):\n{lines}\nSee .env.example for every variable."
        )


@dataclass(frozen=True)
class MySQLSettings:
    host: str
    port: int
    user: str
    # Whether DATALAKE_MYSQL_PASSWORD is set; the value itself reaches the resource as an EnvVar.
    has_password: bool
    ssl_ca: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    # MySQL's --ssl-mode in effect, from DATALAKE_MYSQL_SSL_MODE or its default (resolve_ssl_mode).
    ssl_mode: str | None = None
    # "auto" (Arrow-native reader unless a client certificate) or "rows" (SQLAlchemy/PyMySQL reader).
    reader: str = "auto"


@dataclass(frozen=True)
class SourceSettings:
    """Where the V3 source is: a MySQL server, or the embedded demo database (SQLite)."""

    mysql: MySQLSettings | None
    demo_dir: Path | None
    demo_cdr_rows: int = 20_000
    demo_seed: int = 42

    @property
    def kind(self) -> str:
        return "mysql" if self.mysql is not None else "demo"


@dataclass(frozen=True)
class AzureSettings:
    """Credentials for abfs:// roots. Exactly how they are used lives in the storage layer."""

    has_account_key: bool = False
    has_sas_token: bool = False
    use_default_credential: bool = False
    # Custom blob endpoint (Azurite, sovereign clouds); None = https://<account>.blob.core.windows.net
    blob_endpoint: str | None = None
    duckdb_reader: str = "arrow"  # one of DUCKDB_READERS

    @property
    def configured(self) -> bool:
        return self.has_account_key or self.has_sas_token or self.use_default_credential


# DuckDB's own size syntax: "2GB", "512MiB", "1.5 GB" or a share of the RAM, "75%".
_DUCKDB_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B|%)$", re.IGNORECASE)


def default_duckdb_spill_directory() -> str:
    """Where DuckDB spills what exceeds its memory limit, unless DATALAKE_DUCKDB_TEMP_DIRECTORY says.

    DuckDB's own default is ``.tmp`` in the working directory, which a container's non-root user
    usually cannot create (the image's is root-owned): a silver query larger than the memory
    limit then fails instead of spilling. DuckDB names its spill files per process, so runs
    can share the directory.
    """
    return os.path.join(tempfile.gettempdir(), "datalake-duckdb")


@dataclass(frozen=True)
class DuckDBSettings:
    """The in-process DuckDB of silver and gold (one connection per asset execution)."""

    memory_limit: str = "2GB"
    threads: int | None = None  # None: DuckDB's default, one per core
    # Threads once a connection reads files on Azure (0: keep ``threads``): see DuckDBResource.
    remote_threads: int = 16
    temp_directory: str = field(default_factory=default_duckdb_spill_directory)


@dataclass(frozen=True)
class Settings:
    environment: Environment
    source: SourceSettings
    storage_roots: Mapping[str, str]
    azure: AzureSettings
    partition_start: dt.date
    timezone: str
    extract_lag_seconds: float
    batch_size: int
    registry_path: Path
    bronze_cron: str
    deletes_cron: str = "45 2 * * *"
    v3_pool: str = "v3_mysql"
    # Bytes of Arrow data a bronze row group may hold before it is written (wide rows).
    batch_bytes: int = 32 * 2**20
    # Parallel streams (source connections) the Arrow reader may read one large window in, and
    # the rows each must have at least (see datalake.extract.key_cuts).
    extract_streams: int = 1
    extract_stream_min_rows: int = 250_000
    # Retries of a bronze step after a source fault (connection lost, lock wait), with back-off.
    bronze_max_retries: int = 3
    bronze_retry_delay_seconds: int = 15
    # A bronze asset not updated for this long fails its freshness check (warning).
    bronze_freshness_hours: float = 3.0
    # Past usage days silver/billing_cdr (and so Rev-Sci) rebuilds whenever bronze updates, on top
    # of today: CDRs extracted up to this many days after they started still reach their day.
    silver_late_days: int = 2
    # Whether the bronze schedule and the automation sensor start running when the code location
    # is first loaded (prod) or wait to be switched on in the UI (local).
    automation_running: bool = False
    duckdb: DuckDBSettings = field(default_factory=DuckDBSettings)
    extra: Mapping[str, str] = field(default_factory=dict)

    def root(self, group: str) -> str:
        return self.storage_roots[group]

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def _blob_endpoint_problem(endpoint: str | None, default_credential: bool) -> str | None:
    """Why the blob endpoint cannot be used, or None. Never echoes the value: it may hold a token."""
    if endpoint is None:
        return None
    parsed = urlparse(endpoint)
    if parsed.query or parsed.fragment:
        return f"must be a plain URL without a query (a SAS token belongs in {AZURE_SAS_TOKEN_VAR})"
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "must be an http(s) URL with a host, e.g. https://<account>.blob.core.windows.net"
    if default_credential and parsed.scheme != "https":
        return "DATALAKE_AZURE_USE_DEFAULT_CREDENTIAL needs an https endpoint (token credentials need TLS)"
    return None


def _root_var(group: str) -> str:
    return f"DATALAKE_ROOT_{group.upper()}"


def _storage_root(url: str) -> StorageRoot:
    """The parsed root, checked when the settings load (not at the first write): ValueError says why not."""
    from datalake.storage import parse_root

    root = parse_root(url)
    if not root.is_azure and not os.path.isabs(url.removeprefix("file://")):
        # The code server and every run worker would each resolve it from their own working directory.
        raise ValueError(f"a local or NFS root must be an absolute path, got {url!r}")
    return root


def resolve_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings for the environment named by ``DATALAKE_ENV``.

    Collects every problem before failing, so one error names each missing or invalid variable.
    """
    env = os.environ if environ is None else environ
    problems: dict[str, str] = {}

    def get(name: str) -> str | None:
        value = env.get(name)
        return value.strip() if value is not None and value.strip() != "" else None

    raw_env = (get("DATALAKE_ENV") or Environment.LOCAL.value).lower()
    try:
        environment = Environment(raw_env)
    except ValueError:
        raise SettingsError(
            raw_env, {"DATALAKE_ENV": f"must be one of {[e.value for e in Environment]}, got {raw_env!r}"}
        ) from None
    prod = environment is Environment.PROD

    def require(name: str) -> str | None:
        value = get(name)
        if value is None and prod:
            problems[name] = "required in prod"
        return value

    def parse_int(name: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
        value = get(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            problems[name] = f"must be an integer, got {value!r}"
            return default
        if number < minimum:
            problems[name] = f"must be >= {minimum}, got {number}"
        elif maximum is not None and number > maximum:
            problems[name] = f"must be <= {maximum}, got {number}"
        return number

    def parse_float(name: str, default: float) -> float:
        value = get(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not (0 < number < math.inf):  # also refuses nan and inf
            problems[name] = f"must be a positive number, got {value!r}"
            return default
        return number

    def parse_cron(name: str, default: str) -> str:
        # Dagster's own check, the one a schedule definition applies when the location loads.
        from dagster._utils.schedules import is_valid_cron_string

        value = get(name) or default
        if not is_valid_cron_string(value):
            problems[name] = f"must be a cron expression like {default!r}, got {value!r}"
            return default
        return value

    # --- source -------------------------------------------------------------------
    host = require("DATALAKE_MYSQL_HOST")
    mysql: MySQLSettings | None = None
    demo_dir: Path | None = None
    if host is not None or prod:
        user = require("DATALAKE_MYSQL_USER")
        if get(MYSQL_PASSWORD_VAR) is None and prod:
            problems[MYSQL_PASSWORD_VAR] = "required in prod"
        if host is not None and user is None:
            problems.setdefault("DATALAKE_MYSQL_USER", "required when DATALAKE_MYSQL_HOST is set")
        mysql = MySQLSettings(
            host=host or "",
            port=parse_int("DATALAKE_MYSQL_PORT", 3306, maximum=65535),
            user=user or "",
            has_password=get(MYSQL_PASSWORD_VAR) is not None,
            ssl_ca=get("DATALAKE_MYSQL_SSL_CA"),
            ssl_cert=get("DATALAKE_MYSQL_SSL_CERT"),
            ssl_key=get("DATALAKE_MYSQL_SSL_KEY"),
            ssl_mode=get("DATALAKE_MYSQL_SSL_MODE"),
            reader=(get("DATALAKE_MYSQL_READER") or "auto").lower(),
        )
        try:
            mysql = dataclasses.replace(
                mysql, ssl_mode=resolve_ssl_mode(mysql.ssl_mode, mysql.ssl_ca, mysql.ssl_cert)
            )
        except ValueError as exc:
            problems["DATALAKE_MYSQL_SSL_MODE"] = str(exc)
        if mysql.reader not in ("auto", "rows"):
            problems["DATALAKE_MYSQL_READER"] = f"must be 'auto' or 'rows', got {mysql.reader!r}"
        if (mysql.ssl_cert is None) != (mysql.ssl_key is None):
            problems["DATALAKE_MYSQL_SSL_CERT"] = "DATALAKE_MYSQL_SSL_CERT and _SSL_KEY go together"
    else:
        demo_dir = Path(get("DATALAKE_DEMO_DIR") or REPO_ROOT / "tmp" / "demo_source")
    source = SourceSettings(
        mysql=mysql,
        demo_dir=demo_dir,
        demo_cdr_rows=parse_int("DATALAKE_DEMO_CDR_ROWS", 20_000),
        demo_seed=parse_int("DATALAKE_DEMO_SEED", 42, minimum=0),
    )

    # --- storage ------------------------------------------------------------------
    roots: dict[str, str] = {}
    azure_groups: list[str] = []
    accountless: list[str] = []
    root_accounts: dict[str, str] = {}
    for group in GROUPS:
        value = require(_root_var(group))
        roots[group] = value or str(REPO_ROOT / "tmp" / "dagster_data" / group)
        try:
            parsed_root = _storage_root(roots[group])
            if parsed_root.is_azure:
                azure_groups.append(group)
                if parsed_root.account is None:
                    accountless.append(group)
                else:
                    root_accounts[group] = parsed_root.account
        except ValueError as exc:
            problems[_root_var(group)] = str(exc)

    azure = AzureSettings(
        has_account_key=get(AZURE_ACCOUNT_KEY_VAR) is not None,
        has_sas_token=get(AZURE_SAS_TOKEN_VAR) is not None,
        use_default_credential=(get("DATALAKE_AZURE_USE_DEFAULT_CREDENTIAL") or "false").lower()
        in {"1", "true", "yes"},
        blob_endpoint=get(AZURE_BLOB_ENDPOINT_VAR),
        duckdb_reader=(get(AZURE_DUCKDB_READER_VAR) or "arrow").lower(),
    )
    if azure.duckdb_reader not in DUCKDB_READERS:
        problems[AZURE_DUCKDB_READER_VAR] = (
            f"must be one of {', '.join(DUCKDB_READERS)}, got {get(AZURE_DUCKDB_READER_VAR)!r}"
        )
    endpoint_problem = _blob_endpoint_problem(azure.blob_endpoint, azure.use_default_credential)
    # A path-style endpoint (the emulator's http://host:port/<account>) serves that account only.
    served = urlparse(azure.blob_endpoint).path.strip("/").split("/")[0] if azure.blob_endpoint else ""
    if endpoint_problem:
        problems[AZURE_BLOB_ENDPOINT_VAR] = endpoint_problem
    elif served and any(account != served for account in root_accounts.values()):
        for group, account in root_accounts.items():
            if account != served:
                problems[_root_var(group)] = (
                    f"is on account {account!r}, but {AZURE_BLOB_ENDPOINT_VAR} serves account {served!r} only "
                    "(its path names it): drop the account from the root or use that endpoint's"
                )
    elif accountless and not azure.blob_endpoint:
        for group in accountless:
            problems[_root_var(group)] = (
                "an Azure root without an account needs one: abfs://container@account.dfs.core.windows.net/… "
                f"(or set {AZURE_BLOB_ENDPOINT_VAR}, whose account it then is)"
            )
    if azure_groups and not azure.configured:
        problems[AZURE_ACCOUNT_KEY_VAR] = (
            f"root(s) of {', '.join(azure_groups)} are on Azure: set {AZURE_ACCOUNT_KEY_VAR}, "
            f"{AZURE_SAS_TOKEN_VAR} or DATALAKE_AZURE_USE_DEFAULT_CREDENTIAL=true"
        )

    # --- partitions and extraction ------------------------------------------------
    start_raw = require("DATALAKE_PARTITION_START")
    partition_start = dt.date(2025, 1, 1)
    if start_raw is not None:
        try:
            partition_start = dt.date.fromisoformat(start_raw)
        except ValueError:
            problems["DATALAKE_PARTITION_START"] = f"must be YYYY-MM-DD, got {start_raw!r}"

    timezone = get("DATALAKE_TIMEZONE") or "UTC"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        problems["DATALAKE_TIMEZONE"] = f"unknown IANA time zone {timezone!r}"
        timezone = "UTC"
    today = dt.datetime.now(ZoneInfo(timezone)).date()
    if "DATALAKE_PARTITION_START" not in problems and partition_start > today:
        # Today's partition would not exist: every run (and make demo) failed with an unknown key.
        problems["DATALAKE_PARTITION_START"] = (
            f"must not be after today ({today} in {timezone}), got {start_raw!r}"
        )

    lag_raw = get("DATALAKE_EXTRACT_LAG_SECONDS")
    lag = 5.0
    if lag_raw is not None:
        try:
            lag = float(lag_raw)
            if not (0 <= lag < math.inf):  # also refuses nan and inf
                raise ValueError
        except ValueError:
            problems["DATALAKE_EXTRACT_LAG_SECONDS"] = f"must be a non-negative number, got {lag_raw!r}"

    automation_raw = (get("DATALAKE_AUTOMATION") or ("running" if prod else "stopped")).lower()
    if automation_raw not in ("running", "stopped"):
        problems["DATALAKE_AUTOMATION"] = f"must be 'running' or 'stopped', got {automation_raw!r}"
    automation_running = automation_raw == "running"

    registry_path = Path(get("DATALAKE_REGISTRY") or DEFAULT_REGISTRY)
    if not registry_path.is_file():
        problems["DATALAKE_REGISTRY"] = f"no such file: {registry_path}"

    # --- DuckDB (silver, gold) -------------------------------------------------------
    memory_limit = get("DATALAKE_DUCKDB_MEMORY_LIMIT") or DuckDBSettings.memory_limit
    if not _DUCKDB_SIZE.fullmatch(memory_limit):
        problems["DATALAKE_DUCKDB_MEMORY_LIMIT"] = (
            f"must be a size like 2GB, 512MiB or 75%, got {memory_limit!r}"
        )
    spill = get("DATALAKE_DUCKDB_TEMP_DIRECTORY") or default_duckdb_spill_directory()
    if not os.path.isabs(spill):
        problems["DATALAKE_DUCKDB_TEMP_DIRECTORY"] = f"must be an absolute path, got {spill!r}"
    duckdb = DuckDBSettings(
        memory_limit=memory_limit,
        threads=parse_int("DATALAKE_DUCKDB_THREADS", 0) or None,
        remote_threads=parse_int("DATALAKE_DUCKDB_REMOTE_THREADS", 16, minimum=0),
        temp_directory=spill,
    )

    settings = Settings(
        environment=environment,
        source=source,
        storage_roots=roots,
        azure=azure,
        partition_start=partition_start,
        timezone=timezone,
        extract_lag_seconds=lag,
        batch_size=parse_int("DATALAKE_BATCH_SIZE", 50_000),
        batch_bytes=parse_int("DATALAKE_BATCH_BYTES", 32 * 2**20),
        extract_streams=parse_int("DATALAKE_EXTRACT_STREAMS", 1, maximum=16),
        extract_stream_min_rows=parse_int("DATALAKE_EXTRACT_STREAM_MIN_ROWS", 250_000, minimum=0),
        registry_path=registry_path,
        bronze_cron=parse_cron("DATALAKE_BRONZE_CRON", "15 * * * *"),
        deletes_cron=parse_cron("DATALAKE_DELETES_CRON", "45 2 * * *"),
        v3_pool=get("DATALAKE_V3_POOL") or "v3_mysql",
        bronze_max_retries=parse_int("DATALAKE_BRONZE_MAX_RETRIES", 3, minimum=0),
        bronze_retry_delay_seconds=parse_int("DATALAKE_BRONZE_RETRY_DELAY_SECONDS", 15, minimum=0),
        bronze_freshness_hours=parse_float("DATALAKE_BRONZE_FRESHNESS_HOURS", 3.0),
        silver_late_days=parse_int("DATALAKE_SILVER_LATE_DAYS", 2, minimum=0),
        automation_running=automation_running,
        duckdb=duckdb,
    )
    if problems:
        raise SettingsError(environment.value, problems)
    return settings
