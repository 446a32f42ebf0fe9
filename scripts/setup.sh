#!/usr/bin/env bash
# Creates .venv (if missing) and installs fraiseql into it with its test tools, building the
# native extension with maturin. Needs only: python3 (3.11+) with venv/pip, and cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "maturin>=1.9,<2"
# An editable install: python/ is imported in place, the extension is built by maturin.
.venv/bin/python -m pip install --quiet -e ".[test]"
