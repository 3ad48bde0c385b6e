"""SQLite ledger of every charge the sample backend ever made.

The ledger is the ground truth that tests, demos and benchmarks read to count double charges, so
it records every charge exactly as executed and never deduplicates anything.

Money model: each charge debits the paying customer's account, one balance per currency, which
starts at 0 and goes negative by the charged amount. A double charge therefore shows up both as an
extra charge row and as a balance that is too negative. Balances are derived from the charges
rather than stored, so a charge writes one row and nothing else.

Speed matters more than durability here (benchmarks charge thousands of times per second): one
synchronous connection, WAL journal, ``synchronous=NORMAL`` (no fsync per commit), and a lock so
the connection may also be used from threads other than the event loop's.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

OrderId: TypeAlias = str | int
"""An order id as the client sent it; ``42`` and ``"42"`` name the same order."""

CHARGE_ID_PREFIX = "ch_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id,                -- no declared type: keeps int vs str exactly as sent
    order_key TEXT,          -- str(order_id), what "same order" means; NULL without an order
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    description TEXT,
    charged_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_by_order ON charges (order_key);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO counters (name, value) VALUES ('requests_seen', 0);
"""

_CHARGE_COLUMNS = "id, order_id, amount, currency, description, charged_at"


def order_key(order_id: OrderId) -> str:
    """Return the text form under which an order's charges are grouped."""
    return str(order_id)


def parse_charge_id(charge_id: str) -> int | None:
    """Return the row id behind ``ch_<n>``, or None for anything else."""
    digits = charge_id.removeprefix(CHARGE_ID_PREFIX)
    if digits == charge_id or not digits.isascii() or not digits.isdigit():
        return None
    return int(digits)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _sort_key(key: str) -> tuple[int, int, str]:
    """Sort numeric order ids numerically (2 before 10), then the rest as text."""
    if key.isascii() and key.isdigit():
        return (0, int(key), "")
    return (1, 0, key)


@dataclass(frozen=True, slots=True)
class Charge:
    """One executed charge, as stored and as answered to clients."""

    row_id: int
    order_id: OrderId | None
    amount: int
    currency: str
    description: str | None
    charged_at: str

    @property
    def charge_id(self) -> str:
        """Public id, ``ch_<row id>``; ids keep growing across ledger resets."""
        return f"{CHARGE_ID_PREFIX}{self.row_id}"

    def to_json(self) -> dict[str, Any]:
        """Return the public answer shape shared by every charge endpoint."""
        return {
            "charge_id": self.charge_id,
            "order_id": self.order_id,
            "amount": self.amount,
            "currency": self.currency,
            "status": "succeeded",
            "charged_at": self.charged_at,
        }

    @classmethod
    def _from_row(cls, row: tuple[Any, ...]) -> Charge:
        row_id, order_id, amount, currency, description, charged_at = row
        return cls(row_id, order_id, amount, currency, description, charged_at)


class Ledger:
    """Charges, per-currency balances and a request counter in one SQLite database.

    ``path`` may be ``":memory:"`` for a throwaway ledger.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._unsaved_requests = 0
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection; the ledger is unusable afterwards."""
        with self._lock:
            self._save_requests()
            self._db.close()

    def note_request(self) -> None:
        """Count one request on a charge endpoint, whatever its outcome.

        Counted in memory and stored only by ``summary`` and ``close``, which keeps a write off
        the hot path; a crash loses the requests counted since the last summary.
        """
        with self._lock:
            self._unsaved_requests += 1

    def _save_requests(self) -> None:
        """Add the in-memory request count to the stored one; call with the lock held."""
        if self._unsaved_requests:
            self._db.execute(
                "UPDATE counters SET value = value + ? WHERE name = 'requests_seen'",
                (self._unsaved_requests,),
            )
            self._unsaved_requests = 0

    def charge(
        self,
        *,
        amount: int,
        currency: str,
        order_id: OrderId | None = None,
        description: str | None = None,
    ) -> Charge:
        """Record a charge, debiting the customer; deliberately never deduplicates."""
        charged_at = _now()
        key = None if order_id is None else order_key(order_id)
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO charges"
                " (order_id, order_key, amount, currency, description, charged_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (order_id, key, amount, currency, description, charged_at),
            )
        row_id = cursor.lastrowid
        assert row_id is not None
        return Charge(row_id, order_id, amount, currency, description, charged_at)

    def get_charge(self, charge_id: str) -> Charge | None:
        """Return the charge with public id ``charge_id``, or None."""
        row_id = parse_charge_id(charge_id)
        if row_id is None:
            return None
        with self._lock:
            row = self._db.execute(
                f"SELECT {_CHARGE_COLUMNS} FROM charges WHERE id = ?", (row_id,)
            ).fetchone()
        return None if row is None else Charge._from_row(row)

    def charges_for_order(self, order_id: OrderId) -> list[Charge]:
        """Return every charge made for ``order_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_CHARGE_COLUMNS} FROM charges WHERE order_key = ? ORDER BY id",
                (order_key(order_id),),
            ).fetchall()
        return [Charge._from_row(row) for row in rows]

    def summary(self) -> dict[str, Any]:
        """Return the totals that show at a glance whether anything was charged twice."""
        with self._lock:
            db = self._db
            self._save_requests()
            count, amount_total = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM charges"
            ).fetchone()
            per_order: list[tuple[str, int]] = db.execute(
                "SELECT order_key, COUNT(*) FROM charges"
                " WHERE order_key IS NOT NULL GROUP BY order_key"
            ).fetchall()
            balances: list[tuple[str, int]] = db.execute(
                "SELECT currency, -SUM(amount) FROM charges GROUP BY currency ORDER BY currency"
            ).fetchall()
            (requests_seen,) = db.execute(
                "SELECT value FROM counters WHERE name = 'requests_seen'"
            ).fetchone()
        per_order.sort(key=lambda item: _sort_key(item[0]))
        repeated = [key for key, times in per_order if times > 1]
        return {
            "charges": count,
            "amount_total": amount_total,
            "orders": dict(per_order),
            "orders_charged_more_than_once": repeated,
            "double_charged_count": len(repeated),
            "extra_charges": sum(times - 1 for _, times in per_order),
            "balances": dict(balances),
            "requests_seen": requests_seen,
        }

    def reset(self) -> None:
        """Forget all charges, balances and counts; charge ids still never repeat."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM charges")
                db.execute("UPDATE counters SET value = 0")
                db.execute("COMMIT")
                self._unsaved_requests = 0
            except BaseException:
                db.execute("ROLLBACK")
                raise
