"""Prometheus metrics of the gateway, exposed at `GET /metrics`.

Each `GatewayMetrics` owns its own `CollectorRegistry` (not prometheus-client's global one), so
several gateway apps can live in one process (tests). The gateway calls the small methods below at
the matching points of a session's life; `router()` serves the exposition text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.params import Depends
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics import StateGauge, metrics_router

# Seconds. Unit latency targets are well under 1 s on a GPU; CPU runs of the tiny preset reach seconds.
UNIT_LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class GatewayMetrics:
    """All gateway metrics in one private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        session_labels = ("protocol", "kind")
        self.sessions_active = Gauge(
            "omni_gateway_sessions_active", "Sessions that hold a worker now.", session_labels,
            registry=self.registry,
        )
        self.sessions_queued = Gauge(
            "omni_gateway_sessions_queued", "Sessions waiting in the queue now.", session_labels,
            registry=self.registry,
        )
        self.sessions = Counter(
            "omni_gateway_sessions", "Sessions that were given a worker.", session_labels, registry=self.registry
        )
        self.queue_wait = Histogram(
            "omni_gateway_queue_wait_seconds", "Time from enqueue to worker assignment.",
            buckets=QUEUE_WAIT_BUCKETS, registry=self.registry,
        )
        self.unit_latency = Histogram(
            "omni_gateway_unit_wall_clock_seconds",
            "Worker-reported wall clock per result (decode of the chunk to result ready).",
            buckets=UNIT_LATENCY_BUCKETS, registry=self.registry,
        )
        self.units = Counter(
            "omni_gateway_units", "Model units run, by decision.", ("decision",), registry=self.registry
        )
        self.worker_state = StateGauge(
            "omni_gateway_worker_state", "1 for the state each worker is in, 0 otherwise.", ("worker",),
            self.registry,
        )
        self.errors = Counter(
            "omni_gateway_errors", "Error frames sent to clients, by code.", ("code",), registry=self.registry
        )

    def session_queued(self, kind: str, protocol: str) -> None:
        """A session entered the queue."""
        self.sessions_queued.labels(protocol, kind).inc()

    def session_left_queue(self, kind: str, protocol: str, wait_s: float | None) -> None:
        """A session left the queue: `wait_s` when it got a worker, None when it was cancelled."""
        self.sessions_queued.labels(protocol, kind).dec()
        if wait_s is not None:
            self.queue_wait.observe(wait_s)

    def session_started(self, kind: str, protocol: str) -> None:
        """A session was assigned a worker."""
        self.sessions.labels(protocol, kind).inc()
        self.sessions_active.labels(protocol, kind).inc()

    def session_ended(self, kind: str, protocol: str) -> None:
        """A session that had a worker ended (any reason)."""
        self.sessions_active.labels(protocol, kind).dec()

    def observe_unit(self, result: Mapping[str, Any]) -> None:
        """Record one legacy `result` frame from a worker (PROTOCOL.md §1.8).

        Buffered results (`units: 0`) ran no model unit and are not counted. An aggregated result
        (`units: k`) counts k units under its overall decision.
        """
        units = int(result.get("units", 1))
        if result.get("buffered") or units < 1:
            return
        decision = "listen" if result.get("is_listen") else "speak"
        self.units.labels(decision).inc(units)
        wall_clock_ms = result.get("wall_clock_ms")
        if isinstance(wall_clock_ms, (int, float)):
            self.unit_latency.observe(wall_clock_ms / 1000.0)

    def set_worker_state(self, worker: str, state: str) -> None:
        """Record a worker's current state (e.g. `idle`, `duplex_active`, `offline`)."""
        self.worker_state.set(state, worker)

    def error(self, code: str) -> None:
        """An `error` frame with this code was sent to a client."""
        self.errors.labels(code).inc()

    def router(self, dependencies: Sequence[Depends] = ()) -> APIRouter:
        """`GET /metrics` for this registry; pass `dependencies=[Depends(auth)]` to require an API key."""
        return metrics_router(self.registry, dependencies)
