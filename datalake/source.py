"""The V3 source: a MySQL/MariaDB server, or the embedded demo database.

Connections are read-only by use (every extraction runs in a ``READ ONLY`` transaction),
run with ``time_zone = '+00:00'`` so DATETIME and TIMESTAMP arrive as UTC instants, and
are pre-pinged. The password reaches this resource as an ``EnvVar``; it is passed to the
driver through ``URL.create`` and never rendered into a string, a log line or metadata.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import PrivateAttr

UTC_SESSION = "SET time_zone = '+00:00'"


class V3SourceResource(dg.ConfigurableResource):
    """Connection to the V3 database (``kind='mysql'``) or the embedded demo source (``kind='demo'``)."""

    kind: str = "demo"
    # mysql
    host: str | None = None
    port: int = 3306
    user: str | None = None
    password: str | None = None
    ssl_ca: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    # "auto": the Arrow-native reader (connectorx) for MySQL without TLS, else the row reader;
    # "rows": always the SQLAlchemy/PyMySQL row reader.
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
        if self.ssl_ca or self.ssl_cert:
            connect_args["ssl"] = self._ssl_context()
        return sa.create_engine(url, pool_pre_ping=True, pool_recycle=1800, connect_args=connect_args)

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ssl_ca)
        if self.ssl_cert:
            context.load_cert_chain(self.ssl_cert, self.ssl_key)
        return context

    def arrow_url(self) -> str | None:
        """connectorx URL for the Arrow-native reader, or None where the row reader must be used.

        Contains the password: it is passed to connectorx only, never logged or stored.
        """
        if self.kind != "mysql" or self.reader == "rows" or self.ssl_ca or self.ssl_cert:
            return None
        from urllib.parse import quote

        credentials = quote(self.user or "", safe="")
        if self.password:
            credentials += ":" + quote(self.password, safe="")
        return f"mysql://{credentials}@{self.host}:{self.port}/"

    def describe(self) -> str:
        """Where the source is, for logs and metadata: never includes credentials."""
        if self.kind == "mysql":
            return f"mysql://{self.user}@{self.host}:{self.port}"
        return f"demo sqlite at {self.demo_dir}"
