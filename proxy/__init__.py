"""idempotency-proxy: at most one backend execution per idempotency key, on any replica."""

__version__ = "0.1.0"
