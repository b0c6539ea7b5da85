"""The pool of workers: health polling, slot accounting and dispatch from the FIFO queue.

Workers are addressed by base URL (`http://host:port`), so they may live on other hosts. Each
worker has `capacity` session slots (`service.sessions_per_worker`). A slot is taken *before* the
session is handed to its adapter, and given back only after the worker itself reports, in a health
report requested after the session closed, that the session's resources are freed — a stale `idle`
from before the close is never trusted.

A worker that has not answered `/health` for `service.worker_dead_after_s` is offline: its running
sessions are told through `Assignment.worker_lost`, and it gets no new work until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx

from server.queue import DurationEstimator, QueueFull, SessionKind, SessionQueue, Ticket

log = logging.getLogger("gateway.pool")

RELEASE_POLL_S = 0.1  # health poll interval while a worker owes us a "freed" confirmation
HEALTH_TIMEOUT_S = 2.0
MIN_HEALTH_TIMEOUT_S = 0.2
READY_WORKER_STATES = ("idle", "duplex_active", "duplex_paused", "cleaning_up")


class NoWorker(Exception):
    """No worker that could ever serve the session (all offline or failed)."""

    def __init__(self) -> None:
        super().__init__("No worker available")


def normalize_worker_url(url: str) -> str:
    """`host:port` or `http(s)://host:port[/]` -> `http(s)://host:port`."""
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


@dataclass
class Assignment:
    """A session's claim on one worker slot, from dispatch until release."""

    worker: Worker
    ticket_id: str  # unique key of the claim (clients may reuse session ids)
    session_id: str
    kind: SessionKind
    started_at: float = field(default_factory=time.monotonic)
    worker_lost: asyncio.Event = field(default_factory=asyncio.Event)

    def worker_ws_url(self) -> str:
        """Internal WebSocket URL of this session on its worker."""
        base = self.worker.url.replace("https://", "wss://").replace("http://", "ws://")
        return f"{base}/ws/duplex?{urlencode({'session_id': self.session_id, 'kind': self.kind})}"


@dataclass
class Worker:
    """What the gateway knows about one worker process."""

    index: int
    url: str
    capacity: int
    health: dict[str, Any] = field(default_factory=dict)
    last_ok: float | None = None  # monotonic time of the last answered health poll
    offline: bool = True
    active: dict[str, Assignment] = field(default_factory=dict)  # by ticket id
    releasing: dict[str, tuple[str, float]] = field(default_factory=dict)  # ticket id -> (session id, closed at)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ready(self) -> bool:
        """The worker's own report says it can take sessions."""
        h = self.health
        return (
            h.get("status") == "healthy"
            and h.get("model_loaded") is True
            and h.get("worker_status") in READY_WORKER_STATES
        )

    @property
    def state(self) -> str:
        """offline | error | loading | busy | releasing | idle (the gateway's view)."""
        if self.offline:
            return "offline"
        if self.health.get("status") == "error" or self.health.get("worker_status") == "error":
            return "error"
        if not self.ready:
            return "loading"
        if self.active:
            return "busy"
        if self.releasing:
            return "releasing"
        return "idle"

    @property
    def free_slots(self) -> int:
        if self.offline or not self.ready or self.state == "error":
            return 0
        return max(0, self.capacity - len(self.active) - len(self.releasing))

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        progress = self.health.get("progress") or {}
        return {
            "index": self.index,
            "url": self.url,
            "state": self.state,
            "worker_status": self.health.get("worker_status"),
            "preset": self.health.get("preset"),
            "weights": self.health.get("weights"),
            "gpu_id": self.health.get("gpu_id"),
            "compiled": self.health.get("compiled"),
            "progress": progress or None,
            "sessions": sorted(a.session_id for a in self.active.values()),
            "releasing": sorted(session_id for session_id, _ in self.releasing.values()),
            "last_health_age_s": None if self.last_ok is None else round(now - self.last_ok, 1),
            "total_requests": self.health.get("total_requests"),
            "avg_inference_time_ms": self.health.get("avg_inference_time_ms"),
        }


class WorkerPool:
    """Owns the workers and the queue; hands out `Assignment`s in FIFO order."""

    def __init__(
        self,
        urls: list[str],
        *,
        capacity: int,
        max_queue_size: int,
        health_poll_s: float,
        dead_after_s: float,
        worker_headers: dict[str, str] | None = None,
        on_worker_state: Callable[[str, str], None] | None = None,
    ) -> None:
        """`worker_headers` go with every health request (the worker secret); `on_worker_state(url, state)`
        hears each worker's state after every health poll (metrics)."""
        self.workers = [Worker(i, normalize_worker_url(u), capacity) for i, u in enumerate(urls)]
        self.durations = DurationEstimator()
        self.queue = SessionQueue(max_queue_size, self.durations)
        self.health_poll_s = health_poll_s
        self.dead_after_s = dead_after_s
        self.worker_headers = dict(worker_headers or {})
        self._on_worker_state = on_worker_state
        self._http: httpx.AsyncClient | None = None
        self._pollers: list[asyncio.Task] = []

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Poll every worker once (so the first clients see real states), then keep polling."""
        self._http = httpx.AsyncClient(headers=self.worker_headers, trust_env=False)
        await asyncio.gather(*(self._poll_once(w) for w in self.workers))
        self._pollers = [asyncio.create_task(self._poll_loop(w)) for w in self.workers]

    async def stop(self) -> None:
        for task in self._pollers:
            task.cancel()
        for task in self._pollers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http is not None:
            await self._http.aclose()

    # ---- sessions ----------------------------------------------------------------------------

    def request(self, session_id: str, kind: SessionKind) -> Ticket:
        """Queue a session. `ticket.assigned` resolves to an Assignment (at once if a slot is free).

        Raises NoWorker when no worker could serve it, QueueFull when the queue is at its limit.
        """
        if not any(w.state != "offline" and w.state != "error" for w in self.workers):
            raise NoWorker()
        ticket = self.queue.push(session_id, kind)
        self._dispatch()
        if self.queue.over_limit(ticket):
            self.queue.remove(ticket)
            raise QueueFull(self.queue.max_size)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client left the queue. If a slot was assigned in the meantime, give it back."""
        self.queue.remove(ticket)
        if ticket.assigned.done() and not ticket.assigned.cancelled() and ticket.assigned.exception() is None:
            self._free_slot(ticket.assigned.result())
        else:
            ticket.assigned.cancel()

    def release(self, assignment: Assignment) -> None:
        """The session ended and its worker socket is closed: wait for the worker to confirm."""
        if assignment.ticket_id in assignment.worker.active:
            self.durations.record(assignment.kind, time.monotonic() - assignment.started_at)
        self._free_slot(assignment)

    def _free_slot(self, assignment: Assignment) -> None:
        worker = assignment.worker
        if worker.active.pop(assignment.ticket_id, None) is None:
            return
        worker.releasing[assignment.ticket_id] = (assignment.session_id, time.monotonic())
        worker.wake.set()

    def estimated_wait_s(self, ticket: Ticket) -> float:
        now = time.monotonic()
        remaining = [
            max(0.0, self.durations.expected_s(a.kind) - (now - a.started_at))
            for w in self.workers
            for a in w.active.values()
        ]
        capacity = sum(w.capacity for w in self.workers if w.state not in ("offline", "error"))
        return self.queue.estimated_wait_s(ticket, remaining, capacity)

    def queue_view(self, ticket: Ticket) -> dict[str, Any]:
        """position / estimated_wait_s / queue_length of one ticket."""
        return {
            "position": self.queue.position(ticket),
            "estimated_wait_s": self.estimated_wait_s(ticket),
            "queue_length": len(self.queue),
        }

    def running_sessions(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {"session_id": a.session_id, "kind": a.kind, "worker": w.index, "age_s": round(now - a.started_at, 1)}
            for w in self.workers
            for a in w.active.values()
        ]

    def _dispatch(self) -> None:
        """Hand free slots to the oldest tickets. The slot is taken before the ticket resolves."""
        while len(self.queue):
            worker = max(self.workers, key=lambda w: w.free_slots)
            if worker.free_slots == 0:
                return
            ticket = self.queue.pop_first()
            if ticket is None or ticket.assigned.done():
                continue
            assignment = Assignment(worker, ticket.ticket_id, ticket.session_id, ticket.kind)
            worker.active[ticket.ticket_id] = assignment
            ticket.assigned.set_result(assignment)

    def _fail_queue_if_hopeless(self) -> None:
        """When every worker is offline or failed, waiting clients get `no_worker`."""
        if any(w.state not in ("offline", "error") for w in self.workers):
            return
        while (ticket := self.queue.pop_first()) is not None:
            if not ticket.assigned.done():
                ticket.assigned.set_exception(NoWorker())

    # ---- health ------------------------------------------------------------------------------

    async def _poll_loop(self, worker: Worker) -> None:
        while True:
            interval = RELEASE_POLL_S if worker.releasing else self.health_poll_s
            worker.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(worker.wake.wait(), interval)
            await self._poll_once(worker)

    def _health_timeout_s(self, worker: Worker) -> float:
        """At most HEALTH_TIMEOUT_S, and never past the moment the worker would count as dead, so that
        a hung worker is declared offline `dead_after_s` after its last answer, not a timeout later."""
        if worker.last_ok is None or worker.offline:
            return HEALTH_TIMEOUT_S
        left = self.dead_after_s - (time.monotonic() - worker.last_ok)
        return min(HEALTH_TIMEOUT_S, max(MIN_HEALTH_TIMEOUT_S, left))

    async def _poll_once(self, worker: Worker) -> None:
        assert self._http is not None
        asked_at = time.monotonic()
        try:
            response = await self._http.get(f"{worker.url}/health", timeout=self._health_timeout_s(worker))
            report = response.json()
            if not isinstance(report, dict):
                raise ValueError("health report is not an object")
        except (httpx.HTTPError, ValueError) as exc:
            self._on_health_failure(worker, exc)
            self._report_state(worker)
            return
        if worker.offline:
            log.info("worker %d (%s) is reachable: %s", worker.index, worker.url, report.get("worker_status"))
        worker.offline = False
        worker.last_ok = time.monotonic()
        worker.health = report
        self._confirm_releases(worker, report, asked_at)
        self._dispatch()
        self._fail_queue_if_hopeless()
        self._report_state(worker)

    def _report_state(self, worker: Worker) -> None:
        if self._on_worker_state is not None:
            self._on_worker_state(worker.url, worker.state)

    def _confirm_releases(self, worker: Worker, report: dict[str, Any], asked_at: float) -> None:
        """A report requested after a session closed, showing that session gone, frees its slot."""
        status = report.get("worker_status")
        for ticket_id, (session_id, closed_at) in list(worker.releasing.items()):
            if asked_at < closed_at:
                continue
            if status == "idle" or (
                status in ("duplex_active", "duplex_paused") and report.get("current_session_id") != session_id
            ):
                del worker.releasing[ticket_id]

    def _on_health_failure(self, worker: Worker, exc: Exception) -> None:
        silent_for = None if worker.last_ok is None else time.monotonic() - worker.last_ok
        if worker.offline or (silent_for is not None and silent_for < self.dead_after_s):
            return
        log.warning("worker %d (%s) is offline: no health answer for %.1fs (%s)",
                    worker.index, worker.url, silent_for or 0.0, repr(exc))
        worker.offline = True
        for assignment in worker.active.values():
            assignment.worker_lost.set()
        self._fail_queue_if_hopeless()
