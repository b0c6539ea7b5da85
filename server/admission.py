"""Getting a session from "socket accepted" to "worker assigned", for both protocols.

While the session waits, the client hears a queue message every few seconds, and what it sends
is held in order (PROTOCOL.md §1.9 rule 2) up to the hold limits, except a cancel message
(legacy `stop`, realtime `session.close`), which ends the wait, and consumed-only types
(legacy `client_diagnostic`). The adapter supplies the spelling of the three queue messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from common.config import LimitsConfig
from server.channels import ClientChannel, ClientFrame
from server.metrics import GatewayMetrics
from server.pool import Assignment, NoWorker, WorkerPool
from server.queue import QueueFull, SessionKind, Ticket

QUEUE_UPDATE_INTERVAL_S = 3.0


class Refused(Exception):
    """The session cannot be admitted: `code`, human `message`, and the close code to use."""

    def __init__(self, code: str, message: str, close_code: int = 1013) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


@dataclass(frozen=True)
class HoldLimits:
    """How much a client may send before its messages can go to a worker (PROTOCOL.md §1.9 rule 2): config
    `service.limits.queue_hold_messages` and `queue_hold_bytes`."""

    messages: int
    bytes: int

    @classmethod
    def of(cls, limits: LimitsConfig) -> HoldLimits:
        return cls(limits.queue_hold_messages, limits.queue_hold_bytes)

    def check(self, count: int, size: int, what: str) -> None:
        """Raise Refused `queue_hold_overflow` when `count` held messages of `size` bytes in all exceed the
        limits; `what` names them in the message."""
        if count > self.messages or size > self.bytes:
            raise Refused("queue_hold_overflow",
                          f"Too many {what} (limit {self.messages} messages, {self.bytes} bytes)")


class CancelledByClient(Exception):
    """The client sent its cancel message while queued."""

    def __init__(self, frame: ClientFrame) -> None:
        super().__init__(frame.type or "cancel")
        self.frame = frame


class ClientLeft(Exception):
    """The client disconnected while queued."""


@dataclass
class QueueVocabulary:
    """How one protocol spells the queue messages and which client messages are special."""

    protocol: str  # metrics label: legacy | realtime
    queued: Callable[[dict[str, Any]], dict[str, Any]]
    update: Callable[[dict[str, Any]], dict[str, Any]]
    done: dict[str, Any]
    cancel_types: frozenset[str]
    consumed_types: frozenset[str] = field(default_factory=frozenset)


@dataclass
class Admission:
    assignment: Assignment
    held: list[ClientFrame]


async def admit(
    pool: WorkerPool,
    channel: ClientChannel,
    session_id: str,
    kind: SessionKind,
    vocabulary: QueueVocabulary,
    metrics: GatewayMetrics,
    *,
    hold: HoldLimits,
    enabled_types: Collection[SessionKind],
) -> Admission:
    """Wait for a worker slot; on success `queue_done` has been sent.

    Raises Refused (a session type the operator disabled, queue full, no worker, hold overflow),
    CancelledByClient or ClientLeft; in every failing case the ticket is gone from the queue and any slot
    it got is released.
    """
    if kind not in enabled_types:
        raise Refused("type_disabled", f"{kind} sessions are disabled on this server", close_code=1008)
    try:
        ticket = pool.request(session_id, kind)
    except QueueFull as exc:
        raise Refused("queue_full", str(exc)) from exc
    except NoWorker as exc:
        raise Refused("no_worker", str(exc)) from exc
    metrics.session_queued(kind, vocabulary.protocol)
    try:
        held = await _wait_for_slot(pool, channel, ticket, vocabulary, hold)
    except BaseException:
        metrics.session_left_queue(kind, vocabulary.protocol, None)
        raise
    metrics.session_left_queue(kind, vocabulary.protocol, time.monotonic() - ticket.enqueued_at)
    await channel.send_json(vocabulary.done)
    return Admission(ticket.assigned.result(), held)


async def _wait_for_slot(
    pool: WorkerPool,
    channel: ClientChannel,
    ticket: Ticket,
    vocabulary: QueueVocabulary,
    hold: HoldLimits,
) -> list[ClientFrame]:
    """Queue messages and held frames until the ticket has a slot; returns the held frames."""
    held: list[ClientFrame] = []
    held_bytes = 0
    try:
        if not ticket.assigned.done():
            await channel.send_json(vocabulary.queued({**pool.queue_view(ticket), "ticket_id": ticket.ticket_id}))
        loop = asyncio.get_running_loop()
        next_update = loop.time() + QUEUE_UPDATE_INTERVAL_S
        next_frame = asyncio.ensure_future(channel.next())
        try:
            while not ticket.assigned.done():
                timeout = max(0.0, next_update - loop.time())
                await asyncio.wait({ticket.assigned, next_frame}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                if ticket.assigned.done():
                    break
                if next_frame.done():
                    frame = next_frame.result()
                    next_frame = asyncio.ensure_future(channel.next())
                    if frame is None:
                        raise ClientLeft()
                    if frame.type in vocabulary.cancel_types:
                        raise CancelledByClient(frame)
                    if frame.type in vocabulary.consumed_types:
                        continue
                    held.append(frame)
                    held_bytes += frame.size
                    hold.check(len(held), held_bytes, "messages sent while queued")
                elif loop.time() >= next_update:
                    await channel.send_json(vocabulary.update(pool.queue_view(ticket)))
                    next_update = loop.time() + QUEUE_UPDATE_INTERVAL_S
        finally:
            if next_frame.done() and (late := next_frame.result()) is not None:
                held.append(late)  # arrived together with the assignment: keep its place in order
            next_frame.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await next_frame
        try:
            ticket.assigned.result()
        except NoWorker as exc:
            raise Refused("no_worker", str(exc)) from exc
    except BaseException:
        pool.cancel(ticket)
        raise
    return held
