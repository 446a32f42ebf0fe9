#!/usr/bin/env bash
# Creates .venv (if missing) and installs fraiseql into it with its test tools, building the
# native extension with maturin. Needs only: python3 (3.11+) with venv/pip, and cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { printf '==> %s\n' "$*" >&2; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
step "updating pip and installing maturin"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "maturin>=1.9,<2"
# An editable install: python/ is imported in place, the extension is built by maturin.
step "building fraiseql's Rust extension and installing it with its test tools (the first build takes a few minutes)"
# pip's own lines show the build going on; the "already satisfied" ones are left out. A
# failed install fails the script (pipefail).
.venv/bin/python -m pip install --progress-bar on -e ".[test]" 2>&1 \
  | { grep --line-buffered -vE '^(Requirement already satisfied|  Using cached|  Obtaining|Looking in)' || true; }
step "ready: .venv/bin/fraiseql"
