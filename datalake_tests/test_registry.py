"""The table registry: the shipped file, and load-time errors that name entry and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from datalake.definitions import build_definitions
from datalake.settings import DEFAULT_REGISTRY, resolve_settings
from datalake.specs import CursorKind, Mode, RegistryError, load_registry, parse_registry

GOOD = {
    "schema": "v3_billing",
    "table": "invoice",
    "primary_key": ["invoice_id"],
    "cursor": {"column": "updated_at"},
}


def test_shipped_registry_covers_every_demo_table() -> None:
    from datalake.demo.schema import metadata

    specs = load_registry(DEFAULT_REGISTRY)
    demo_tables = {f"{t.schema}.{t.name}" for t in metadata.sorted_tables}
    assert {s.qualified_name for s in specs} == demo_tables
    for spec in specs:
        table = metadata.tables[spec.qualified_name]
        assert tuple(c.name for c in table.primary_key.columns) == spec.primary_key, spec.qualified_name
        if spec.mode is Mode.SNAPSHOT:
            continue
        assert spec.cursor is not None and spec.cursor.column in table.c
        assert spec.window_column is not None and spec.window_column in table.c


def test_integer_cursor_table_has_a_date_column() -> None:
    cdr = next(s for s in load_registry(DEFAULT_REGISTRY) if s.table == "billing_cdr")
    assert cdr.cursor is not None and cdr.cursor.kind is CursorKind.INTEGER
    assert cdr.window_column == "created_at"


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        ({**GOOD, "primary_kee": ["invoice_id"]}, "primary_kee", "unknown key"),
        ({k: v for k, v in GOOD.items() if k != "primary_key"}, "primary_key", "required"),
        ({**GOOD, "primary_key": []}, "primary_key", "at least 1"),
        ({**GOOD, "table": "invoice; DROP TABLE x"}, "table", "not a plain identifier"),
        ({**GOOD, "schema": "v3-billing"}, "schema", "not a plain identifier"),
        ({**GOOD, "primary_key": ["id`"]}, "primary_key", "not a plain identifier"),
        ({**GOOD, "mode": "streaming"}, "mode", "incremental"),
        ({**GOOD, "cursor": None}, "cursor", "required when mode is incremental"),
        (
            {**GOOD, "cursor": {"column": "id", "kind": "integer"}},
            "date_column",
            "required for an integer cursor",
        ),
        (
            {**GOOD, "cursor": {"column": "id", "kind": "integer"}, "date_column": "id"},
            "date_column",
            "not the integer cursor",
        ),
        ({**GOOD, "batch_size": 0}, "batch_size", "greater than 0"),
        ({**GOOD, "batch_bytes": -1}, "batch_bytes", "greater than 0"),
        ({**GOOD, "streams": 0}, "streams", "greater than 0"),
        ({**GOOD, "streams": 17}, "streams", "less than or equal to 16"),
        ({**GOOD, "null_cursor": "maybe"}, "null_cursor", "capture"),
        ({**GOOD, "exclude_columns": ["invoice_id"]}, "exclude_columns", "primary-key"),
        ({**GOOD, "tinyint1_as_integer": ["is paid"]}, "tinyint1_as_integer", "not a plain identifier"),
        ({**GOOD, "tinyint1_as_integer": ["paid", "paid"]}, "tinyint1_as_integer", "duplicate column"),
        (
            {**GOOD, "tinyint1_as_integer": ["paid"], "exclude_columns": ["paid"]},
            "tinyint1_as_integer",
            "also in exclude_columns",
        ),
    ],
)
def test_bad_entry_names_entry_and_field(entry: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_registry({"tables": [entry]})
    text = str(info.value)
    assert "tables[0]" in text
    assert f"'{field}'" in text
    assert message in text


def test_duplicate_entry_is_named() -> None:
    with pytest.raises(RegistryError) as info:
        parse_registry({"tables": [GOOD, dict(GOOD)]})
    assert "tables[1] (v3_billing.invoice): field 'table': duplicate table" in str(info.value)
    # Two tables under one asset name: the field that gave the name is named.
    with pytest.raises(RegistryError) as info:
        parse_registry({"tables": [GOOD, {**GOOD, "table": "invoice_archive", "name": "invoice"}]})
    assert "field 'name': duplicate asset name 'invoice'" in str(info.value)


def test_an_entry_whose_schema_comes_from_defaults_is_named_by_its_table() -> None:
    entry = {k: v for k, v in GOOD.items() if k != "schema"} | {"primary_key": []}
    with pytest.raises(RegistryError) as info:
        parse_registry({"defaults": {"schema": "v3_billing"}, "tables": [entry]})
    assert "tables[0] (v3_billing.invoice): field 'primary_key'" in str(info.value)


def test_every_bad_entry_is_reported_at_once() -> None:
    with pytest.raises(RegistryError) as info:
        parse_registry({"tables": [{**GOOD, "bogus": 1}, GOOD, {**GOOD, "table": "x y"}]})
    assert "2 invalid entries" in str(info.value)


def test_registry_file_from_the_environment_drives_the_assets(tmp_path: Path) -> None:
    registry = tmp_path / "team.yaml"
    registry.write_text(
        yaml.safe_dump(
            {
                "tables": [
                    GOOD,
                    {"schema": "crm", "table": "lead", "primary_key": ["lead_id"], "mode": "snapshot"},
                ]
            }
        )
    )
    defs = build_definitions(resolve_settings({"DATALAKE_REGISTRY": str(registry)}))
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    # one bronze asset per entry, and the current state of the incremental one
    assert keys == {"bronze/invoice", "bronze/lead", "silver/invoice_current"}


def test_bad_registry_fails_definition_loading(tmp_path: Path) -> None:
    registry = tmp_path / "bad.yaml"
    registry.write_text(yaml.safe_dump({"tables": [{**GOOD, "cursor": {"column": "updated at"}}]}))
    with pytest.raises(RegistryError, match=r"tables\[0\] \(v3_billing.invoice\): field 'cursor.column'"):
        build_definitions(resolve_settings({"DATALAKE_REGISTRY": str(registry)}))


def test_an_unknown_top_level_key_is_named() -> None:
    with pytest.raises(RegistryError) as info:
        parse_registry({"defualts": {"schema": "v3_billing"}, "tables": [GOOD]})
    assert "unknown key(s): defualts" in str(info.value)
