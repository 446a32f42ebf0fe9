#!/usr/bin/env bash
# Creates .venv (if missing) and installs fraiseql into it with its test tools, building the
# native extension with maturin, and Chromium for the browser tests. Needs only: python3 (3.11+)
# with venv/pip, cargo, and apt-get (as root) or an installed chromium.
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
# The console's browser tests drive Debian's Chromium (Playwright's own download is not used).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    step "installing Chromium for the console's browser tests (apt-get install chromium)"
    apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    step "Chromium is missing: install it (e.g. sudo apt-get install chromium) for the console's browser tests"
  fi
fi
step "ready: .venv/bin/fraiseql"
