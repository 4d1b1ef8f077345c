"""The demo "V3" OLTP source: schema (MySQL/MariaDB and embedded SQLite) and a seeded generator.

``python -m datalake.demo --help`` seeds or mutates a source from the command line.
"""

from datalake.demo.generator import checksum, checksums, default_anchor, demo_engine, mutate, seed_source
from datalake.demo.schema import (
    SCHEMAS,
    TABLES,
    create_schemas,
    create_tables,
    drop_schemas,
    metadata,
    mysql_engine,
    sqlite_engine,
    table_key,
)

__all__ = [
    "SCHEMAS",
    "TABLES",
    "checksum",
    "checksums",
    "create_schemas",
    "create_tables",
    "default_anchor",
    "demo_engine",
    "drop_schemas",
    "metadata",
    "mutate",
    "mysql_engine",
    "seed_source",
    "sqlite_engine",
    "table_key",
]
