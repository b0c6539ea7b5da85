"""FIFO queue of sessions waiting for a worker, with positions and wait estimates.

A `Ticket` stands for one waiting client. The pool (server/pool.py) pops tickets in order when a
worker slot frees up and resolves `ticket.assigned` with the slot. Estimates follow the reference
gateway: a per-kind baseline session duration (audio duplex 120 s, omni duplex 90 s) that an EMA
(alpha 0.3) of observed durations replaces once at least 3 sessions of that kind have ended.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

SessionKind = Literal["audio_duplex", "omni_duplex"]

BASELINE_DURATION_S: dict[str, float] = {"audio_duplex": 120.0, "omni_duplex": 90.0}
EMA_ALPHA = 0.3
EMA_MIN_SAMPLES = 3


class QueueFull(Exception):
    """The queue already holds `max_queue_size` tickets."""

    def __init__(self, max_size: int) -> None:
        super().__init__(f"Queue full ({max_size} requests)")
        self.max_size = max_size


class DurationEstimator:
    """Expected session duration per kind: baseline until enough samples, then an EMA."""

    def __init__(self) -> None:
        self._ema: dict[str, float] = {}
        self._samples: dict[str, int] = {}

    def record(self, kind: str, duration_s: float) -> None:
        """Feed the duration of a session that just ended."""
        previous = self._ema.get(kind)
        self._ema[kind] = duration_s if previous is None else EMA_ALPHA * duration_s + (1 - EMA_ALPHA) * previous
        self._samples[kind] = self._samples.get(kind, 0) + 1

    def expected_s(self, kind: str) -> float:
        if self._samples.get(kind, 0) >= EMA_MIN_SAMPLES:
            return self._ema[kind]
        return BASELINE_DURATION_S.get(kind, BASELINE_DURATION_S["omni_duplex"])

    def snapshot(self) -> dict[str, Any]:
        return {
            kind: {"expected_s": round(self.expected_s(kind), 1), "samples": self._samples.get(kind, 0)}
            for kind in BASELINE_DURATION_S
        }


@dataclass
class Ticket:
    """One client waiting for a worker."""

    session_id: str
    kind: SessionKind
    ticket_id: str = field(default_factory=lambda: "q_" + secrets.token_hex(6))
    enqueued_at: float = field(default_factory=time.monotonic)
    assigned: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SessionQueue:
    """Ordered waiting room. Positions are 1-based."""

    def __init__(self, max_size: int, durations: DurationEstimator) -> None:
        self.max_size = max_size
        self.durations = durations
        self._tickets: OrderedDict[str, Ticket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tickets)

    def push(self, session_id: str, kind: SessionKind) -> Ticket:
        """Append a ticket. The limit applies to tickets left waiting (`over_limit`): one that a free slot
        serves at once never counts, so `max_size` 0 still admits sessions while a slot is free."""
        ticket = Ticket(session_id=session_id, kind=kind)
        self._tickets[ticket.ticket_id] = ticket
        return ticket

    def over_limit(self, ticket: Ticket) -> bool:
        """Whether `ticket` waits behind `max_size` others or more (it must be refused: QueueFull)."""
        return self.position(ticket) > self.max_size

    def remove(self, ticket: Ticket) -> bool:
        """Drop a ticket (client left, or it was served). Returns whether it was queued."""
        return self._tickets.pop(ticket.ticket_id, None) is not None

    def pop_first(self) -> Ticket | None:
        if not self._tickets:
            return None
        _, ticket = self._tickets.popitem(last=False)
        return ticket

    def tickets(self) -> list[Ticket]:
        return list(self._tickets.values())

    def position(self, ticket: Ticket) -> int:
        """1-based position, or 0 when the ticket is no longer queued."""
        for index, ticket_id in enumerate(self._tickets, start=1):
            if ticket_id == ticket.ticket_id:
                return index
        return 0

    def estimated_wait_s(self, ticket: Ticket, running_remaining_s: list[float], capacity: int) -> float:
        """Wait estimate: the earliest end of a running session, plus the sessions queued ahead
        shared over all slots."""
        ahead = 0.0
        for queued in self._tickets.values():
            if queued.ticket_id == ticket.ticket_id:
                break
            ahead += self.durations.expected_s(queued.kind)
        first_free = min(running_remaining_s, default=0.0)
        return round(first_free + ahead / max(capacity, 1), 1)
