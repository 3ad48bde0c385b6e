"""A small payment API that is deliberately NOT idempotent, with a SQLite ledger.

It charges again on every POST, so it is both what the idempotency proxy protects and the witness
that counts the double charges a proxy let through (``GET /v1/ledger``).
"""

from sample_backend.app import create_app
from sample_backend.faults import Faults
from sample_backend.ledger import Charge, Ledger

__all__ = ["Charge", "Faults", "Ledger", "create_app"]
