"""Engine throughput with a trivial Python handler (sync and async), in-memory transport.

    .venv/bin/python benches/python_handler.py [events]

Prints events/s end to end (emit from Python → native engine → Python handler → drain) and,
as the same run's baseline, the rate of emitting into an engine whose only observer never
matches (the cost of crossing into the engine alone).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import fraiseql

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
ROW = {"id": "ord_1", "status": "pending", "total": 1500.0, "is_premium": True}


def run(handler: Any, condition: str | None) -> float:
    reg = fraiseql.Registry()
    old = fraiseql.set_registry(reg)
    try:

        @fraiseql.type
        class Order:
            id: str
            status: str
            total: float
            is_premium: bool

        fraiseql.subscription(entity_type=Order, operation="create", condition=condition)(handler)
        with fraiseql.Engine() as engine:
            started = time.perf_counter()
            for _ in range(N):
                engine.emit("Order", "INSERT", ROW)
            engine.drain()
            return N / (time.perf_counter() - started)
    finally:
        fraiseql.set_registry(old)


def main() -> None:
    calls = 0

    def sync_handler(order: Any) -> None:
        nonlocal calls
        calls += 1

    async def async_handler(order: Any) -> None:
        nonlocal calls
        calls += 1

    print(f"python handler throughput, {N} events")
    print(f"  baseline: emit only (condition never true) {run(sync_handler, 'total < 0'):>9.0f} events/s")
    print(f"  sync handler                               {run(sync_handler, None):>9.0f} events/s")
    print(f"  async handler                              {run(async_handler, None):>9.0f} events/s")
    assert calls == 2 * N, calls


if __name__ == "__main__":
    main()
