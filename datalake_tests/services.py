"""Throwaway MariaDB, PostgreSQL and Azurite servers for the test suite.

Each ``start_*`` function starts a private server on a free loopback port, in a
directory of its own, and returns a dataclass describing it. The servers are
real processes (no mocks, no system services): the tests talk to them exactly
as the code location talks to production.

Lifecycle rules shared by every server:

* it runs in a session of its own (``start_new_session=True``) so that a Ctrl-C
  in the terminal reaches pytest only, and pytest decides when to stop it;
* on Linux it is wrapped in ``setpriv --pdeathsig`` (which execs, so the PID is
  still the server's own) so it also dies if the test process dies without
  running its finalizers; this is bound to the *thread* that started it, so
  start servers from the main thread;
* ``stop()`` signals only the PID it started (and its process group), waits,
  then SIGKILLs; ``cleanup()`` deletes only the data directory ``start_*``
  created. Logs stay in ``base_dir`` for post-mortems.

Nothing here imports pytest: the fixtures in ``conftest.py`` are thin wrappers,
and the functions can be used from scripts or benchmarks as well.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar
from urllib.parse import quote

if TYPE_CHECKING:
    from datalake_tests.tls import PKI

REPO_ROOT = Path(__file__).resolve().parent.parent
AZURITE_BLOB_BIN = REPO_ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
INSTALL_HINT = "run `bash scripts/install-test-deps.sh` as root"

LOOPBACK = "127.0.0.1"
ZONEINFO_DIR = Path("/usr/share/zoneinfo")

# The well-known development account every Azurite instance accepts; public by design.
AZURITE_ACCOUNT_NAME = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
# A second account on the same emulator: lake roots on two storage accounts (test-only key).
AZURITE_SECOND_ACCOUNT_NAME = "lakeaccount2"
AZURITE_SECOND_ACCOUNT_KEY = base64.b64encode(b"datalake-tests-second-account-key-0123456789").decode()

# Linux limits AF_UNIX socket paths to 108 bytes including the NUL; servers fail
# with obscure errors past it, so long base dirs get a short socket dir instead.
_MAX_SOCKET_PATH = 100
_LOG_TAIL_CHARS = 6000


class ServiceStartError(RuntimeError):
    """A test service could not be started; the message says why (with its log)."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago.

    The OS picks it from the ephemeral range, so a collision with another
    process binding in the gap before the server does is unlikely but possible.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pid_is_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0) but is dead for every purpose of ours.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop_process(
    pid: int,
    *,
    process: subprocess.Popen[bytes] | None = None,
    sig: signal.Signals = signal.SIGTERM,
    group: bool = True,
    timeout: float = 20.0,
) -> None:
    """Send ``sig`` to ``pid`` (or its process group), wait up to ``timeout`` s, then SIGKILL.

    ``process``, when given, is used to reap the child so that it does not stay
    around as a zombie. The SIGKILL goes to the whole process group, because a
    server killed hard would otherwise leave its workers behind. Nothing is
    sent once the process is gone: its PID may already belong to someone else.
    """

    def alive() -> bool:
        if process is not None:
            return process.poll() is None
        return pid_is_running(pid)

    def send(s: signal.Signals, to_group: bool) -> None:
        if to_group:
            try:
                os.killpg(pid, s)
                return
            except ProcessLookupError:
                pass  # not a group leader after all (e.g. a PID handed in from elsewhere)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, s)

    for current_sig, to_group, wait_s in ((sig, group, timeout), (signal.SIGKILL, True, 10.0)):
        if not alive():
            break
        send(current_sig, to_group)
        deadline = time.monotonic() + wait_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        if alive():
            raise RuntimeError(f"process {pid} survived SIGKILL")


@dataclass(kw_only=True)
class ManagedServer:
    """A server process started by this module."""

    pid: int
    host: str = LOOPBACK
    log_path: Path
    # The directory holding the server's data; ``cleanup()`` deletes exactly this.
    data_root: Path
    startup_seconds: float = 0.0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    # How the server wants to be told to shut down cleanly.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    stop_group: ClassVar[bool] = True

    def is_running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return pid_is_running(self.pid)

    def stop(self, timeout: float = 20.0) -> None:
        """Shut the server down; a no-op if it is not running. Deletes nothing."""
        stop_process(
            self.pid, process=self.process, sig=self.stop_signal, group=self.stop_group, timeout=timeout
        )

    def cleanup(self) -> None:
        """Delete the server's data directory (after ``stop()``); logs are kept."""
        if self.is_running():
            raise RuntimeError(f"refusing to delete {self.data_root} of running server {self.pid}")
        shutil.rmtree(self.data_root, ignore_errors=True)

    def log_tail(self) -> str:
        return _read_tail(self.log_path)


_S = TypeVar("_S", bound=ManagedServer)


# ---------------------------------------------------------------- helpers


def _read_tail(path: Path, chars: int = _LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text[-chars:]


def _find_binary(name: str, extra_dirs: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin", "/sbin")) -> str:
    # Non-root PATHs usually lack the sbin dirs where Debian puts mariadbd.
    search_path = os.pathsep.join([os.environ.get("PATH", ""), *extra_dirs])
    found = shutil.which(name, path=search_path)
    if found is None:
        raise ServiceStartError(f"`{name}` not found; {INSTALL_HINT}")
    return found


def _wrapper(run_as: str | None, death_signal: signal.Signals) -> list[str]:
    """Command prefix that drops to ``run_as`` and arms the parent-death signal.

    setpriv execs the server (unlike runuser/su, which fork to close a PAM
    session), so the PID we record is the server's own. The death signal is set
    after the uid change, which would otherwise clear it.
    """
    setpriv = shutil.which("setpriv", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin"]))
    if setpriv is None:
        if run_as is not None:
            raise ServiceStartError("`setpriv` (util-linux) is needed to run a server as another user")
        return []
    prefix = [setpriv]
    if run_as is not None:
        prefix += [f"--reuid={run_as}", f"--regid={run_as}", "--init-groups"]
    return [*prefix, "--pdeathsig", death_signal.name.removeprefix("SIG"), "--"]


def _spawn(
    argv: list[str],
    *,
    log_path: Path,
    cwd: Path,
    run_as: str | None = None,
    death_signal: signal.Signals = signal.SIGTERM,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        try:
            return subprocess.Popen(
                [*_wrapper(run_as, death_signal), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                env=None if env is None else {**os.environ, **env},
            )
        except OSError as exc:
            raise ServiceStartError(f"cannot run {argv[0]}: {exc}") from exc


def _run(
    argv: list[str],
    *,
    log_path: Path,
    cwd: Path,
    what: str,
    input: bytes | None = None,
    timeout: float = 120.0,
) -> None:
    """Run a setup command to completion, appending its output to ``log_path``."""
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        try:
            result = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServiceStartError(
                f"{what} failed: {exc}\n--- {log_path} ---\n{_read_tail(log_path)}"
            ) from exc
    if result.returncode != 0:
        raise ServiceStartError(
            f"{what} exited with {result.returncode}\n--- {log_path} ---\n{_read_tail(log_path)}"
        )


def _wait_until_ready(
    check: Callable[[], object],
    *,
    process: subprocess.Popen[bytes],
    what: str,
    logs: list[Path],
    timeout: float,
) -> None:
    """Call ``check`` until it stops raising, the process dies, or time runs out."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        exit_code = process.poll()
        if exit_code is not None:
            problem = f"{what} exited with code {exit_code} while starting"
            break
        try:
            check()
            return
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            problem = f"{what} not ready after {timeout:.0f} s (last error: {last_error!r})"
            break
        time.sleep(0.1)
    details = "".join(f"\n--- {path} ---\n{_read_tail(path)}" for path in logs)
    raise ServiceStartError(problem + details)


def _tcp_accepts(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=1.0):
        pass


def _short_socket_dir(preferred: Path, socket_name: str) -> Path:
    if len(str(preferred / socket_name)) <= _MAX_SOCKET_PATH:
        return preferred
    return Path(tempfile.mkdtemp(prefix="dl-sock-"))


def _start_guarded(process: subprocess.Popen[bytes], build: Callable[[], _S], started_at: float) -> _S:
    """Run ``build`` (readiness wait + setup); never leave the process behind if it fails."""
    try:
        server = build()
    except BaseException:
        stop_process(process.pid, process=process, timeout=10.0)
        raise
    server.startup_seconds = time.monotonic() - started_at
    return server


# ---------------------------------------------------------------- MariaDB


@dataclass(kw_only=True)
class MariaDBServer(ManagedServer):
    """A private ``mariadbd`` with an all-privileges user and a read-only user."""

    port: int
    user: str
    password: str
    ro_user: str
    ro_password: str
    socket: Path
    datadir: Path
    error_log: Path

    def _url(self, user: str, password: str, database: str | None) -> str:
        db = quote(database, safe="") if database else ""
        return (
            f"mysql+pymysql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{db}?charset=utf8mb4"
        )

    def url(self, database: str | None = None) -> str:
        """SQLAlchemy URL for the all-privileges user."""
        return self._url(self.user, self.password, database)

    def ro_url(self, database: str | None = None) -> str:
        """SQLAlchemy URL for the read-only (``SELECT, PROCESS``) user."""
        return self._url(self.ro_user, self.ro_password, database)


_MARIADB_USER = "datalake"
_MARIADB_PASSWORD = "datalake-test-pw"
_MARIADB_RO_USER = "datalake_ro"
_MARIADB_RO_PASSWORD = "datalake-ro-test-pw"


def _mariadb_setup_sql() -> bytes:
    return f"""
-- mariadb-install-db also creates a password-less root for TCP; tests must go
-- through the users below so privilege problems surface here, not in production.
DROP USER IF EXISTS 'root'@'127.0.0.1', 'root'@'::1';
CREATE USER '{_MARIADB_USER}'@'%' IDENTIFIED BY '{_MARIADB_PASSWORD}';
GRANT ALL PRIVILEGES ON *.* TO '{_MARIADB_USER}'@'%' WITH GRANT OPTION;
CREATE USER '{_MARIADB_RO_USER}'@'%' IDENTIFIED BY '{_MARIADB_RO_PASSWORD}';
GRANT SELECT, SHOW VIEW, PROCESS ON *.* TO '{_MARIADB_RO_USER}'@'%';
FLUSH PRIVILEGES;
""".encode()


MARIADB_SYSTEM_TIME_ZONE = "Asia/Tokyo"  # ahead of UTC; sessions use +00:00 (--default-time-zone)


def start_mariadb(base_dir: Path, *, timeout: float = 60.0, tls: PKI | None = None) -> MariaDBServer:
    """Initialise a throwaway datadir under ``base_dir`` and start ``mariadbd`` on a free port.

    With ``tls`` the server offers TLS with that PKI's server certificate and trusts its CA for
    client certificates (plain connections stay allowed unless a user ``REQUIRE``s TLS).
    """
    import pymysql

    started_at = time.monotonic()
    mariadbd = _find_binary("mariadbd")
    install_db = _find_binary("mariadb-install-db")
    client = _find_binary("mariadb")
    tzinfo_to_sql = _find_binary("mariadb-tzinfo-to-sql")
    if not ZONEINFO_DIR.is_dir():
        raise ServiceStartError(f"{ZONEINFO_DIR} missing (apt package tzdata); named time zones need it")

    base_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="mariadb-", dir=base_dir))
    datadir = root / "data"
    sock = _short_socket_dir(root, "mysqld.sock") / "mysqld.sock"
    error_log = root / "error.log"
    setup_log = root / "setup.log"
    stdout_log = root / "mariadbd.out"
    is_root = os.geteuid() == 0
    # mariadbd refuses to run as root unless told to; as non-root the flag would only warn.
    user_args = ["--user=root"] if is_root else []

    _run(
        [
            install_db,
            "--no-defaults",  # /etc/mysql/my.cnf points at the system instance's paths
            f"--datadir={datadir}",
            *user_args,
            # A password-less root reachable through our private socket only;
            # the default (unix_socket auth) would tie root to the OS user.
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        log_path=setup_log,
        cwd=root,
        what="mariadb-install-db",
    )

    port = free_port()
    process = _spawn(
        [
            mariadbd,
            "--no-defaults",
            f"--datadir={datadir}",
            f"--tmpdir={root}",
            *user_args,
            f"--port={port}",
            f"--bind-address={LOOPBACK}",
            f"--socket={sock}",
            f"--pid-file={root / 'mariadbd.pid'}",
            f"--log-error={error_log}",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=256M",
            "--local-infile=1",
            "--max-allowed-packet=256M",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
            "--default-time-zone=+00:00",
            # Throwaway data: flushing the redo log on every commit only slows tests down.
            "--innodb-flush-log-at-trx-commit=2",
            *(
                [f"--ssl-ca={tls.ca}", f"--ssl-cert={tls.server_cert}", f"--ssl-key={tls.server_key}"]
                if tls
                else []
            ),
        ],
        log_path=stdout_log,
        cwd=root,
        # The server's own clock zone is not UTC, like many production hosts: what reads its
        # system-zone values (innodb_trx.trx_started) must convert them.
        env={"TZ": MARIADB_SYSTEM_TIME_ZONE},
    )

    def build() -> MariaDBServer:
        logs = [error_log, stdout_log]

        def root_select_1() -> None:
            conn = pymysql.connect(unix_socket=str(sock), user="root", password="", connect_timeout=2)
            conn.close()

        _wait_until_ready(root_select_1, process=process, what="mariadbd", logs=logs, timeout=timeout)

        # Named zones (SET time_zone='Europe/Berlin') need the tz tables filled;
        # done once here because it takes about a second.
        tz_sql = subprocess.run(
            [tzinfo_to_sql, str(ZONEINFO_DIR)], capture_output=True, check=False, timeout=120
        )
        if tz_sql.returncode != 0:
            raise ServiceStartError(f"mariadb-tzinfo-to-sql failed: {tz_sql.stderr.decode(errors='replace')}")
        _run(
            [client, "--no-defaults", f"--socket={sock}", "--user=root", "mysql"],
            input=tz_sql.stdout + _mariadb_setup_sql(),
            log_path=setup_log,
            cwd=root,
            what="loading time zones and creating users",
        )

        server = MariaDBServer(
            pid=process.pid,
            process=process,
            log_path=error_log,
            data_root=datadir,
            port=port,
            user=_MARIADB_USER,
            password=_MARIADB_PASSWORD,
            ro_user=_MARIADB_RO_USER,
            ro_password=_MARIADB_RO_PASSWORD,
            socket=sock,
            datadir=datadir,
            error_log=error_log,
        )

        def tcp_select_1() -> None:
            conn = pymysql.connect(
                host=LOOPBACK, port=port, user=server.user, password=server.password, connect_timeout=2
            )
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            finally:
                conn.close()

        _wait_until_ready(tcp_select_1, process=process, what="mariadbd (TCP)", logs=logs, timeout=timeout)
        return server

    return _start_guarded(process, build, started_at)


# ---------------------------------------------------------------- PostgreSQL


@dataclass(kw_only=True)
class PostgresServer(ManagedServer):
    """A private ``postgres`` with a password-authenticated user owning one database."""

    port: int
    user: str
    password: str
    database: str
    datadir: Path
    socket_dir: Path

    # SIGINT is PostgreSQL's "fast" shutdown; SIGTERM ("smart") would wait for the
    # pooled connections the test process still holds. Only the postmaster is
    # signalled: it stops its workers in order.
    stop_signal: ClassVar[signal.Signals] = signal.SIGINT
    stop_group: ClassVar[bool] = False

    def url(self, database: str | None = None) -> str:
        """SQLAlchemy URL (psycopg2 driver, as dagster-postgres uses)."""
        return (
            f"postgresql+psycopg2://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database or self.database, safe='')}"
        )


_PG_USER = "dagster"
_PG_PASSWORD = "dagster-test-pw"
_PG_DATABASE = "dagster"
_PG_SUPERUSER = "postgres"


def postgres_bindir() -> Path:
    """``bin`` of the newest PostgreSQL installed from Debian's packages."""

    def version(path: str) -> int:
        try:
            return int(Path(path).parent.parent.name)
        except ValueError:
            return -1

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=version)
    if candidates:
        return Path(candidates[-1]).parent
    return Path(_find_binary("postgres")).parent


_PG_EXTERNAL_PREFIX = "datalake-pg-"


def _remove_stale_postgres_dirs(min_age_s: float = 3600.0) -> None:
    """Delete clusters left in the temp dir by test runs that were killed hard.

    A cluster counts as stale only when its server is down (no postmaster.pid;
    the parent-death SIGINT makes PostgreSQL remove it) and it is old enough
    that no other session can still be setting it up.
    """
    now = time.time()
    for candidate in Path(tempfile.gettempdir()).glob(f"{_PG_EXTERNAL_PREFIX}*"):
        try:
            if (
                candidate / "data" / "postmaster.pid"
            ).exists() or now - candidate.stat().st_mtime < min_age_s:
                continue
        except OSError:
            continue
        shutil.rmtree(candidate, ignore_errors=True)


def start_postgres(base_dir: Path, *, timeout: float = 60.0) -> PostgresServer:
    """``initdb`` a throwaway cluster and start ``postgres`` on a free port.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the
    ``postgres`` OS user. pytest's base temp dir is mode 0700 (and pytest resets
    it on every run), so that user cannot reach it: the cluster then lives in a
    fresh dir under the system temp dir, which ``cleanup()`` removes. Logs go to
    ``base_dir`` either way, written through a descriptor opened by us.
    """
    import psycopg2

    started_at = time.monotonic()
    bindir = postgres_bindir()
    run_as: str | None = None
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        run_as = _PG_SUPERUSER
        try:
            owner = pwd.getpwnam(run_as)
        except KeyError as exc:
            raise ServiceStartError(f"OS user {run_as!r} missing; {INSTALL_HINT}") from exc

    base_dir.mkdir(parents=True, exist_ok=True)
    log_root = Path(tempfile.mkdtemp(prefix="postgres-", dir=base_dir))
    if owner is None:
        root = log_root
        socket_dir = _short_socket_dir(root, ".s.PGSQL.65535")
    else:
        _remove_stale_postgres_dirs()
        root = Path(tempfile.mkdtemp(prefix=_PG_EXTERNAL_PREFIX))
        os.chown(root, owner.pw_uid, owner.pw_gid)
        # Lets whoever debugs a failed run find the cluster from pytest's tmp dir.
        (log_root / "cluster").symlink_to(root)
        # Short already (directly under the temp dir) and reachable by the owner.
        socket_dir = root
    datadir = root / "data"
    setup_log = log_root / "setup.log"
    server_log = log_root / "postgres.log"

    try:
        _run(
            [
                *_wrapper(run_as, signal.SIGTERM),
                str(bindir / "initdb"),
                f"--pgdata={datadir}",
                f"--username={_PG_SUPERUSER}",
                "--encoding=UTF8",
                "--locale=C",
                # Our private socket is the only way in for the superuser; TCP needs a password.
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",  # throwaway cluster: skip the fsync of every file
            ],
            log_path=setup_log,
            cwd=root,
            what="initdb",
        )
    except BaseException:
        if run_as is not None:
            shutil.rmtree(root, ignore_errors=True)
        raise

    port = free_port()
    process = _spawn(
        [
            str(bindir / "postgres"),
            "-D",
            str(datadir),
            "-p",
            str(port),
            "-k",
            str(socket_dir),
            "-c",
            f"listen_addresses={LOOPBACK}",
            "-c",
            "TimeZone=UTC",
            # Throwaway cluster: durability only costs time.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ],
        log_path=server_log,
        cwd=root,
        run_as=run_as,
        death_signal=PostgresServer.stop_signal,
    )

    def build() -> PostgresServer:
        logs = [server_log]

        def superuser_connect() -> psycopg2.extensions.connection:
            return psycopg2.connect(
                host=str(socket_dir), port=port, user=_PG_SUPERUSER, dbname="postgres", connect_timeout=2
            )

        _wait_until_ready(
            lambda: superuser_connect().close(), process=process, what="postgres", logs=logs, timeout=timeout
        )
        conn = superuser_connect()
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f"CREATE ROLE {_PG_USER} LOGIN PASSWORD %s", (_PG_PASSWORD,))
                cur.execute(f"CREATE DATABASE {_PG_DATABASE} OWNER {_PG_USER}")
        finally:
            conn.close()

        def tcp_select_1() -> None:
            tcp = psycopg2.connect(
                host=LOOPBACK,
                port=port,
                user=_PG_USER,
                password=_PG_PASSWORD,
                dbname=_PG_DATABASE,
                connect_timeout=2,
            )
            try:
                with tcp.cursor() as cur:
                    cur.execute("SELECT 1")
            finally:
                tcp.close()

        _wait_until_ready(tcp_select_1, process=process, what="postgres (TCP)", logs=logs, timeout=timeout)
        return PostgresServer(
            pid=process.pid,
            process=process,
            log_path=server_log,
            data_root=root if run_as is not None else datadir,
            port=port,
            user=_PG_USER,
            password=_PG_PASSWORD,
            database=_PG_DATABASE,
            datadir=datadir,
            socket_dir=socket_dir,
        )

    try:
        return _start_guarded(process, build, started_at)
    except BaseException:
        if run_as is not None:
            shutil.rmtree(root, ignore_errors=True)
        raise


# ---------------------------------------------------------------- Azurite


@dataclass(kw_only=True)
class AzuriteServer(ManagedServer):
    """A private Azurite blob service with the well-known development account (and a second one)."""

    blob_port: int
    location: Path
    account_name: str = AZURITE_ACCOUNT_NAME
    account_key: str = AZURITE_ACCOUNT_KEY

    @property
    def blob_endpoint(self) -> str:
        return f"http://{self.host}:{self.blob_port}/{self.account_name}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account_name};"
            f"AccountKey={self.account_key};BlobEndpoint={self.blob_endpoint};"
        )

    def second_account(self) -> AzuriteServer:
        """The same emulator seen as its second storage account."""
        return dataclasses.replace(
            self, account_name=AZURITE_SECOND_ACCOUNT_NAME, account_key=AZURITE_SECOND_ACCOUNT_KEY
        )


def start_azurite(base_dir: Path, *, timeout: float = 60.0) -> AzuriteServer:
    """Start ``azurite-blob`` (installed into ``.tools/azurite``) on a free port."""
    from azure.storage.blob import BlobServiceClient

    started_at = time.monotonic()
    if not AZURITE_BLOB_BIN.exists():
        raise ServiceStartError(f"{AZURITE_BLOB_BIN} missing; {INSTALL_HINT}")
    if shutil.which("node") is None:
        raise ServiceStartError(f"`node` not found; {INSTALL_HINT}")

    base_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="azurite-", dir=base_dir))
    location = root / "data"
    location.mkdir()
    log_path = root / "azurite.log"
    port = free_port()
    process = _spawn(
        [
            str(AZURITE_BLOB_BIN),
            "--blobHost",
            LOOPBACK,
            "--blobPort",
            str(port),
            "--location",
            str(location),
            # The Azure SDK in the venv may speak a newer API version than this Azurite knows.
            "--skipApiVersionCheck",
            # Accept headers/parameters Azurite does not implement instead of failing the request.
            "--loose",
            "--silent",
            # Azurite otherwise phones home (Application Insights); the tests must
            # stay on loopback, and the failed lookups only clutter the log.
            "--disableTelemetry",
        ],
        log_path=log_path,
        cwd=root,
        # Setting accounts replaces the default one, so it is listed too.
        env={
            "AZURITE_ACCOUNTS": f"{AZURITE_ACCOUNT_NAME}:{AZURITE_ACCOUNT_KEY};"
            f"{AZURITE_SECOND_ACCOUNT_NAME}:{AZURITE_SECOND_ACCOUNT_KEY}"
        },
    )

    def build() -> AzuriteServer:
        server = AzuriteServer(
            pid=process.pid,
            process=process,
            log_path=log_path,
            data_root=location,
            blob_port=port,
            location=location,
        )
        # No SDK retries: the readiness loop retries, and the SDK's backoff would
        # turn every early "connection refused" into seconds of waiting.
        client = BlobServiceClient.from_connection_string(server.connection_string, retry_total=0)

        def ready() -> None:
            _tcp_accepts(LOOPBACK, port)
            list(client.list_containers())

        _wait_until_ready(ready, process=process, what="azurite-blob", logs=[log_path], timeout=timeout)
        return server

    return _start_guarded(process, build, started_at)


# ---------------------------------------------------------------- Dagster processes (deployment tests)


@dataclass(kw_only=True)
class DagsterProcess(ManagedServer):
    """A Dagster code server, webserver or daemon started by ``start_dagster_process``.

    ``data_root`` is the process's own scratch directory (its log lives there too); nothing
    else is owned by it. ``stop()`` signals the process group: a code server's gRPC child
    and the run workers it launched go down with it.
    """

    argv: list[str]
    port: int | None = None


def start_dagster_process(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    what: str,
    ready: Callable[[], object],
    port: int | None = None,
    timeout: float = 120.0,
) -> DagsterProcess:
    """Start ``argv`` (a ``dagster``/``dagster-webserver``/``dagster-daemon`` command) in its own session.

    ``env`` is the complete environment (nothing is inherited): the deployment tests decide
    exactly which variables a process sees, as a container would. ``ready`` is called until
    it stops raising; if the process exits or ``timeout`` passes first, it is stopped and
    ``ServiceStartError`` carries its log.
    """
    started_at = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(
                [*_wrapper(None, signal.SIGTERM), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServiceStartError(f"cannot run {argv[0]}: {exc}") from exc

    def build() -> DagsterProcess:
        _wait_until_ready(ready, process=process, what=what, logs=[log_path], timeout=timeout)
        return DagsterProcess(
            pid=process.pid,
            process=process,
            log_path=log_path,
            data_root=cwd,
            argv=list(argv),
            port=port,
        )

    return _start_guarded(process, build, started_at)


def grpc_health_check(dagster_bin: Path, port: int, *, env: dict[str, str], host: str = LOOPBACK) -> None:
    """``dagster api grpc-health-check`` against ``host:port``; raises unless it passes."""
    result = subprocess.run(
        [str(dagster_bin), "api", "grpc-health-check", "-h", host, "-p", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"grpc-health-check exited {result.returncode}: {result.stdout}{result.stderr}")


def http_get_ok(url: str) -> None:
    """Raises unless ``url`` answers 200 (used as a readiness check for the webserver)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")


def code_server_ready(dagster_bin: Path, port: int, *, env: dict[str, str], host: str = LOOPBACK) -> None:
    """Readiness of a code server: its port accepts (cheap to poll), then the gRPC health check passes.

    The health check alone costs a Python start-up per attempt; the TCP probe fails fast until
    the server has loaded the code and bound the port.
    """
    _tcp_accepts(host, port)
    grpc_health_check(dagster_bin, port, env=env, host=host)
