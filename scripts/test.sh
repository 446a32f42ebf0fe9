#!/usr/bin/env bash
# Every test: Rust (unit tests, and live tests against services the tests find or start
# themselves) and Python (pytest against live services that its harness finds or starts),
# plus format, lint and type checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --quiet
.venv/bin/ruff check python tests examples
.venv/bin/mypy
.venv/bin/python -m mypy.stubtest fraiseql._native
.venv/bin/python -m pytest "$@"
