#!/usr/bin/env bash
# Every test: Rust (core crate, against nothing but itself) and Python (pytest against live
# services that the harness finds or starts), plus format, lint and type checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The live PostgreSQL tests (--test postgres) run from pytest, against the harness database.
cargo test -p fraiseql_observers --quiet --lib --test actions --test condition_alloc
.venv/bin/ruff check python tests examples
.venv/bin/mypy
.venv/bin/python -m mypy.stubtest fraiseql._native
.venv/bin/python -m pytest "$@"
