"""Scalar types for `@fraiseql.type` fields.

They are plain Python types (or `NewType`s of them) so that type checkers understand entity
instances; values captured from PostgreSQL arrive as JSON and are converted to these types
when a handler receives an entity instance.
"""

from __future__ import annotations

import datetime as _dt
import decimal as _decimal
import uuid as _uuid
from typing import Any, NewType

ID = NewType("ID", str)
"""An entity identifier, delivered as a string."""

DateTime = _dt.datetime
Date = _dt.date
Time = _dt.time
UUID = _uuid.UUID
Decimal = _decimal.Decimal
Email = NewType("Email", str)
URL = NewType("URL", str)
JSON = Any

__all__ = ["ID", "JSON", "URL", "UUID", "Date", "DateTime", "Decimal", "Email", "Time"]
