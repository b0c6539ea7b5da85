"""The shared secret between the gateway and its workers (config `auth.worker_secret`).

The gateway presents it in a header on every request and WebSocket it opens to a worker; the worker
refuses its internal WebSocket without it. Both sides import this module, so neither depends on the other.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

WORKER_SECRET_HEADER = "x-worker-secret"


def worker_secret_headers(secret: str | None) -> dict[str, str]:
    """Headers the gateway adds to every request and WebSocket it opens to a worker."""
    return {WORKER_SECRET_HEADER: secret} if secret else {}


def worker_secret_ok(headers: Mapping[str, str], secret: str | None) -> bool:
    """Worker side: True when no secret is configured or the request carries the right one."""
    if not secret:
        return True
    return hmac.compare_digest(headers.get(WORKER_SECRET_HEADER, "").encode(), secret.encode())
