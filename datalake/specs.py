"""Table specs: the typed, validated registry of source tables.

One YAML entry per source table (``datalake/registry.yaml``, or the file named by
``DATALAKE_REGISTRY``). Each entry becomes one bronze asset ``bronze/<name>``; adding
a table is one entry, no code. The registry is validated when definitions load, and
every error names the entry and the field.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from datalake.settings import BRONZE

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _check_identifier(value: str) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise ValueError(f"{value!r} is not a plain identifier (letters, digits, underscore; max 64)")
    return value


Identifier = Annotated[str, Field(min_length=1)]


class Mode(StrEnum):
    INCREMENTAL = "incremental"
    SNAPSHOT = "snapshot"


class CursorKind(StrEnum):
    TIMESTAMP = "timestamp"
    INTEGER = "integer"


class NullCursorPolicy(StrEnum):
    # Rows whose cursor is NULL are read on every incremental run (silver dedups them).
    CAPTURE = "capture"
    # They are not extracted; the null-cursor check reports how many exist.
    SKIP = "skip"


class Cursor(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    column: Identifier
    kind: CursorKind = CursorKind.TIMESTAMP

    _ident = field_validator("column")(_check_identifier)


class TableSpec(BaseModel):
    """One source table and how it is extracted."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source_schema: Identifier = Field(alias="schema")
    table: Identifier
    primary_key: tuple[Identifier, ...] = Field(min_length=1)
    mode: Mode = Mode.INCREMENTAL
    cursor: Cursor | None = None
    # Timestamp column that places a row on a day, for date-window backfills of integer cursors.
    date_column: Identifier | None = None
    group: Identifier = BRONZE
    batch_size: int | None = Field(default=None, gt=0)
    # A row group (and the memory a read holds) also ends at this many bytes of Arrow data.
    batch_bytes: int | None = Field(default=None, gt=0)
    # Parallel streams a large read of this table may use (default: DATALAKE_EXTRACT_STREAMS).
    streams: int | None = Field(default=None, gt=0, le=16)
    null_cursor: NullCursorPolicy = NullCursorPolicy.CAPTURE
    exclude_columns: tuple[Identifier, ...] = ()
    # TINYINT(1) columns read as the numbers they hold (int8/uint8), not as booleans: MySQL's BOOL
    # is TINYINT(1), and a read as bool refuses any other value rather than store it as true.
    tinyint1_as_integer: tuple[Identifier, ...] = ()
    # Asset name; defaults to the table name (set it when two schemas share a table name).
    name: Identifier | None = None
    description: str | None = None

    @field_validator("source_schema", "table", "group", "date_column", "name")
    @classmethod
    def _identifiers(cls, value: str | None) -> str | None:
        return None if value is None else _check_identifier(value)

    @field_validator("primary_key", "exclude_columns", "tinyint1_as_integer")
    @classmethod
    def _identifier_lists(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            _check_identifier(item)
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate column in {list(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TableSpec:
        if self.mode is Mode.INCREMENTAL and self.cursor is None:
            raise ValueError("cursor: required when mode is incremental")
        if self.mode is Mode.SNAPSHOT and self.cursor is not None:
            raise ValueError("cursor: a snapshot table has no cursor (mode: snapshot reads it whole)")
        if self.cursor is not None and self.cursor.kind is CursorKind.INTEGER and self.date_column is None:
            raise ValueError("date_column: required for an integer cursor (date-window backfills)")
        if (
            self.cursor is not None
            and self.cursor.kind is CursorKind.INTEGER
            and self.date_column == self.cursor.column
        ):
            raise ValueError("date_column: must be a date/time column, not the integer cursor")
        excluded = set(self.exclude_columns)
        if excluded & set(self.primary_key):
            raise ValueError("exclude_columns: cannot exclude a primary-key column")
        if self.cursor is not None and self.cursor.column in excluded:
            raise ValueError("exclude_columns: cannot exclude the cursor column")
        both = sorted(excluded & set(self.tinyint1_as_integer))
        if both:
            raise ValueError(f"tinyint1_as_integer: {both} also in exclude_columns (it is not read)")
        return self

    @property
    def asset_name(self) -> str:
        return self.name or self.table

    @property
    def qualified_name(self) -> str:
        return f"{self.source_schema}.{self.table}"

    @property
    def window_column(self) -> str | None:
        """Column whose value places a row in an ingestion day (backfill windows)."""
        if self.date_column is not None:
            return self.date_column
        return self.cursor.column if self.cursor is not None else None


class RegistryError(ValueError):
    pass


def _loc(error: Any) -> str:
    return ".".join(str(part) for part in error["loc"]) or "(entry)"


def parse_registry(document: Any, *, origin: str = "registry") -> tuple[TableSpec, ...]:
    if not isinstance(document, dict) or set(document) - {"defaults", "tables"}:
        unknown = (
            sorted(map(str, set(document) - {"defaults", "tables"})) if isinstance(document, dict) else []
        )
        raise RegistryError(
            f"{origin}: the top level must be a mapping with 'tables' (and optional 'defaults')"
            + (f"; unknown key(s): {', '.join(unknown)}" if unknown else "")
        )
    defaults = document.get("defaults") or {}
    entries = document.get("tables")
    if not isinstance(defaults, dict):
        raise RegistryError(f"{origin}: defaults must be a mapping")
    if not isinstance(entries, list) or not entries:
        raise RegistryError(f"{origin}: 'tables' must be a non-empty list")

    specs: list[TableSpec] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(entries):
        label = f"tables[{index}]"
        named = {**defaults, **entry} if isinstance(entry, dict) else {}
        if "schema" in named and "table" in named:  # the schema may come from defaults
            label += f" ({named['schema']}.{named['table']})"
        if not isinstance(entry, dict):
            errors.append(f"{label}: must be a mapping")
            continue
        try:
            spec = TableSpec.model_validate({**defaults, **entry})
        except ValidationError as exc:
            for err in exc.errors():
                field = _loc(err)
                if field == "schema" or field == "source_schema":
                    field = "schema"
                message = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    message = "unknown key"
                if field == "(entry)" and ": " in message:
                    # cross-field checks name their field as "field: why"
                    field, message = message.split(": ", 1)
                errors.append(f"{label}: field '{field}': {message}")
            continue
        asset_field = "name" if spec.name else "table"  # where this entry's asset name comes from
        for key, what, field in (
            (spec.qualified_name, "table", "table"),
            (spec.asset_name, "asset name", asset_field),
        ):
            if key in seen:
                errors.append(f"{label}: field '{field}': duplicate {what} {key!r} (also {seen[key]})")
            seen[key] = label
        specs.append(spec)
    if errors:
        raise RegistryError(
            f"{origin}: {len(errors)} invalid entr{'y' if len(errors) == 1 else 'ies'}:\n  "
            + "\n  ".join(errors)
        )
    return tuple(specs)


def load_registry(path: Path) -> tuple[TableSpec, ...]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from exc
    return parse_registry(document, origin=str(path))
