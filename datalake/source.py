"""The V3 source: a MySQL/MariaDB server, or the embedded demo database.

Connections are read-only by use (every extraction runs in a ``READ ONLY`` transaction),
run with ``time_zone = '+00:00'`` so DATETIME and TIMESTAMP arrive as UTC instants, and
are pre-pinged. The password reaches this resource as an ``EnvVar``; it is passed to the
driver through ``URL.create`` and never rendered into a string, a log line or metadata.

TLS follows MySQL's ``--ssl-mode``, for both readers (see ``resolve_ssl_mode``):

===============  =========================================================================
disabled         plain TCP
preferred        TLS when the server offers it, unverified (the default without a CA)
required         TLS or no connection; the server certificate is not verified
verify_ca        TLS; the certificate must chain to ``ssl_ca`` (or the system's CAs)
verify_identity  as verify_ca, and the certificate must name the host (the default with a CA)
===============  =========================================================================

The Arrow-native reader (connectorx) verifies the same way, and under ``preferred`` encrypts
exactly when the planning connection did. connectorx cannot present a client certificate, so
with ``ssl_cert`` the row reader reads.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import dagster as dg
import sqlalchemy as sa
from pydantic import Field, PrivateAttr
from sqlalchemy import event

from datalake.settings import VERIFYING_MODES, resolve_ssl_mode

UTC_SESSION = "SET time_zone = '+00:00'"


class V3SourceResource(dg.ConfigurableResource):
    """Connection to the V3 database (``kind='mysql'``) or the embedded demo source (``kind='demo'``)."""

    kind: str = "demo"
    # mysql
    host: str | None = None
    port: int = 3306
    user: str | None = None
    # repr=False: a resource's repr (an f-string in a log line, an error) must not carry it.
    password: str | None = Field(default=None, repr=False)
    ssl_ca: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    # disabled | preferred | required | verify_ca | verify_identity; None: see resolve_ssl_mode
    ssl_mode: str | None = None
    # "auto": the Arrow-native reader (connectorx) for MySQL unless a client certificate is
    # set, else the row reader; "rows": always the SQLAlchemy/PyMySQL row reader.
    reader: str = "auto"
    connect_timeout: int = 20
    read_timeout: int = 3600
    # demo
    demo_dir: str | None = None
    demo_seed: int = 42
    demo_cdr_rows: int = 20_000

    _engine: sa.Engine | None = PrivateAttr(default=None)

    @property
    def dialect(self) -> str:
        return "mysql" if self.kind == "mysql" else "sqlite"

    def engine(self) -> sa.Engine:
        if self._engine is None:
            self._engine = self._create_engine()
        return self._engine

    def _create_engine(self) -> sa.Engine:
        if self.kind == "demo":
            from datalake.demo.generator import demo_engine

            if not self.demo_dir:
                raise ValueError("demo source needs demo_dir")
            return demo_engine(Path(self.demo_dir), seed=self.demo_seed, cdr_rows=self.demo_cdr_rows)
        if self.kind != "mysql":
            raise ValueError(f"kind must be 'mysql' or 'demo', got {self.kind!r}")
        if not self.host or not self.user:
            raise ValueError("mysql source needs host and user")
        url = sa.URL.create(
            "mysql+pymysql",
            username=self.user,
            password=self.password,
            host=self.host,
            port=self.port,
            query={"charset": "utf8mb4"},
        )
        connect_args: dict[str, Any] = {
            "init_command": UTC_SESSION,
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
        }
        mode = self.tls_mode
        if mode == "disabled":
            connect_args["ssl_disabled"] = True
        elif mode != "preferred":  # PyMySQL's own default is "preferred"
            connect_args["ssl"] = self._ssl_context(mode)
        engine = sa.create_engine(url, pool_pre_ping=True, pool_recycle=1800, connect_args=connect_args)
        if mode == "preferred":
            _prefer_tls(engine, self._ssl_context("required"))
        return engine

    @property
    def tls_mode(self) -> str:
        return resolve_ssl_mode(self.ssl_mode, self.ssl_ca, self.ssl_cert)

    def _ssl_context(self, mode: str) -> ssl.SSLContext:
        if mode in VERIFYING_MODES:
            context = ssl.create_default_context(cafile=self.ssl_ca)  # the system's CAs without one
            context.check_hostname = mode == "verify_identity"
        else:  # required: encrypted, the server's certificate is not checked
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.ssl_cert:
            context.load_cert_chain(self.ssl_cert, self.ssl_key)
        return context

    @property
    def reads_arrow(self) -> bool:
        """Whether extractions use the Arrow-native reader (connectorx) rather than the row reader."""
        return self.kind == "mysql" and self.reader != "rows" and not self.ssl_cert

    def arrow_url(self, conn: sa.Connection) -> str:
        """connectorx URL for the Arrow-native reader, with the TLS of ``conn`` (a planning connection).

        Contains the password: it is passed to connectorx only, never logged or stored.
        """
        if not self.reads_arrow:
            raise ValueError(f"{self.describe()} is read by the row reader")
        mode = self.tls_mode
        if mode == "preferred":  # encrypt exactly when the server offered TLS to the planning connection
            cipher = conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Ssl_cipher'").first()
            mode = "required" if cipher is not None and cipher[1] else "disabled"
        query = {"ssl-mode": mode}
        if self.ssl_ca and mode in VERIFYING_MODES:
            query["ssl-ca"] = self.ssl_ca
        credentials = quote(self.user or "", safe="")
        if self.password:
            credentials += ":" + quote(self.password, safe="")
        return f"mysql://{credentials}@{self.host}:{self.port}/?{urlencode(query)}"

    def describe(self) -> str:
        """Where the source is, for logs and metadata: never includes credentials."""
        if self.kind == "mysql":
            return f"mysql://{self.user}@{self.host}:{self.port} (tls {self.tls_mode})"
        return f"demo sqlite at {self.demo_dir}"


def _prefer_tls(engine: sa.Engine, context: ssl.SSLContext) -> None:
    """PyMySQL's "preferred" (TLS when the server offers it), with one unverified context for all.

    PyMySQL builds a context for each new connection with ``ssl.create_default_context()``,
    which loads the system's CA bundle (~16 ms of CPU here) for a certificate that "preferred"
    does not verify. So the connection is made deferred without one, then put in PyMySQL's
    preferred state (``ssl`` on, not required) with this context, then connected.
    """

    @event.listens_for(engine, "do_connect")
    def connect(dialect: sa.Dialect, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        connection = dialect.loaded_dbapi.connect(*cargs, **cparams, ssl_disabled=True, defer_connect=True)
        connection.ssl, connection.ctx = True, context
        connection.connect()
        return connection
