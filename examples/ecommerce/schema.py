"""The spec's e-commerce schema: Order and Payment, with observers written in Python."""

from __future__ import annotations

import sys

import fraiseql
from fraiseql.scalars import ID, DateTime


def say(line: str) -> None:
    """One write per line, so lines from handlers running concurrently never interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@fraiseql.type
class Order:
    id: ID
    customer_email: str
    status: str
    total: float
    created_at: DateTime


@fraiseql.type
class Payment:
    id: ID
    order_id: ID
    amount: float
    status: str
    processed_at: DateTime | None


@fraiseql.subscription(
    entity_type=Order,
    topic="order.created",
    operation="create",
    checkpoint=fraiseql.EffectivelyOnce(idempotency_table="billing_observer_keys"),
    retry=fraiseql.Retry(max_attempts=1),
)
def charge_customer(order: Order) -> None:
    """Charges the customer. Must not execute twice."""
    say(f"charge_customer: charged {order.customer_email} {order.total:.2f} for {order.id}")


@fraiseql.subscription(entity_type=Order, topic="order.created", operation="create", condition="total > 1000")
def on_high_value_order(order: Order, event: fraiseql.Event) -> None:
    say(f"on_high_value_order: {order.id} total={order.total} (event {event.id})")


@fraiseql.subscription(
    entity_type=Order,
    topic="order.updated",
    operation="update",
    condition="status.changed() && status == 'shipped'",
)
async def on_order_shipped(order: Order, event: fraiseql.Event) -> None:
    previous = (event.old or {}).get("status")
    say(f"on_order_shipped: {order.id} {previous} -> {order.status}")


@fraiseql.subscription(
    entity_type=Payment, topic="payment.updated", operation="update", condition="status == 'failed'"
)
def on_payment_failed(payment: Payment) -> None:
    say(f"on_payment_failed: payment {payment.id} of order {payment.order_id} failed")
