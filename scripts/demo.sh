#!/usr/bin/env bash
# The main job: builds fraiseql and runs the e-commerce example's observers on the
# in-memory transport, feeding it the example's events.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd examples/ecommerce
exec ../../.venv/bin/fraiseql run --config fraiseql.toml --events events.jsonl
