#!/usr/bin/env bash
# Every test: Rust (unit tests, and live tests against services the tests find or start
# themselves) and Python (pytest against live services that its harness finds or starts),
# plus format, lint and type checks, and a short run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
stage() { printf '\n==> %s\n' "$*" >&2; }
stage "setup"
bash scripts/setup.sh
stage "cargo fmt --check"
cargo fmt --all -- --check
stage "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
stage "cargo test (unit, doc and live tests)"
cargo test --workspace --quiet
stage "fuzz: every target for 10 s from its corpus (scripts/fuzz.sh)"
bash scripts/fuzz.sh 10
stage "ruff"
.venv/bin/ruff check python tests examples
stage "mypy"
.venv/bin/mypy
stage "stubtest"
.venv/bin/python -m mypy.stubtest fraiseql._native
stage "pytest (live services)"
.venv/bin/python -m pytest "$@"
