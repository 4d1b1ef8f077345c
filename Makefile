# The team's interface. The README's two set-up commands are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

# Persistent, git-ignored local Dagster instance (SQLite) for `make demo` and `make dev`: always
# this one (an exported DAGSTER_HOME of another instance would get its dagster.yaml replaced).
export DAGSTER_HOME := $(CURDIR)/.dagster_home
# Where scripts/install-uv.sh puts uv when the machine has none.
export PATH := $(HOME)/.local/bin:$(PATH)
DEV_PORT ?= 3000

.PHONY: setup demo dev test lint bench clean-lake

setup:
	@scripts/bootstrap.sh

$(DAGSTER_HOME)/dagster.yaml: deploy/dagster.local.yaml
	@mkdir -p $(DAGSTER_HOME)
	cp deploy/dagster.local.yaml $(DAGSTER_HOME)/dagster.yaml

## demo: seed the embedded V3 source, backfill 7 bronze partitions, run today's incremental run, silver, Rev-Sci
demo: setup $(DAGSTER_HOME)/dagster.yaml
	uv run python -m datalake.cli demo --days 7

## dev: the Dagster UI + daemon on http://127.0.0.1:$(DEV_PORT) with the demo source
dev: setup $(DAGSTER_HOME)/dagster.yaml
	uv run dagster dev -w workspace.yaml -h 127.0.0.1 -p $(DEV_PORT)

## test: install the test services if missing (MariaDB, PostgreSQL, Azurite), then pytest
test: setup
	scripts/install-test-deps.sh
	uv run pytest

## lint: ruff + pyright
lint: setup
	uv run ruff check .
	uv run ruff format --check .
	uv run pyright

## bench: extraction and lake benchmarks side by side with the alternatives
bench:
	scripts/bootstrap.sh --group bench
	scripts/install-test-deps.sh
	uv run python -m bench

## clean-lake: remove the local lake, demo source and local instance (tmp/, .dagster_home/)
clean-lake:
	rm -rf tmp .dagster_home
