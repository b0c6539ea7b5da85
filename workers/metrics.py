"""Prometheus metrics of one worker process, exposed at the worker's `GET /metrics`.

`WorkerMetrics` owns a private `CollectorRegistry` so tests can build several workers in one
process. The worker calls its methods at start-up (phase durations, compile cache), per session and
per unit; `router()` serves the exposition text.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics import StateGauge, metrics_router

# The per-unit stages of UnitResult.timings_ms (docs/ARCHITECTURE.md) plus the deferred finalize.
UNIT_STAGES = ("prefill", "vision", "audio", "llm", "tts_prep", "tts", "token2wav", "generate", "finalize")
START_PHASES = ("load", "compile", "warmup")
STAGE_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


class WorkerMetrics:
    """All worker metrics in one private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage_latency = Histogram(
            "omni_worker_unit_stage_seconds", "Time per unit stage.", ("stage",),
            buckets=STAGE_BUCKETS, registry=self.registry,
        )
        self.units = Counter(
            "omni_worker_units", "Units run, by decision.", ("decision",), registry=self.registry
        )
        self.state = StateGauge(
            "omni_worker_state", "1 for the worker's current state, 0 otherwise.", (), self.registry
        )
        self.start_phase = Gauge(
            "omni_worker_start_phase_seconds", "Duration of each start-up phase.", ("phase",),
            registry=self.registry,
        )
        self.compile_cache = Counter(
            "omni_worker_compile_cache", "torch.compile cache lookups at start-up.", ("result",),
            registry=self.registry,
        )
        self.sessions = Counter("omni_worker_sessions", "Sessions served.", registry=self.registry)
        self.errors = Counter(
            "omni_worker_errors", "Error frames sent, by code.", ("code",), registry=self.registry
        )

    def observe_unit(self, is_listen: bool, timings_ms: Mapping[str, float]) -> None:
        """Record one unit: its decision and the time of each known stage (`UnitResult.timings_ms`)."""
        self.units.labels("listen" if is_listen else "speak").inc()
        for stage, ms in timings_ms.items():
            if stage in UNIT_STAGES and ms is not None:
                self.stage_latency.labels(stage).observe(ms / 1000.0)

    def observe_finalize(self, seconds: float) -> None:
        """Record one (deferred) finalize."""
        self.stage_latency.labels("finalize").observe(seconds)

    def set_state(self, state: str) -> None:
        """Record the worker status reported by /health (`loading`, `idle`, `duplex_active`, ...)."""
        self.state.set(state)

    def observe_start_phase(self, phase: str, seconds: float) -> None:
        """Record how long a start-up phase (`load`, `compile`, `warmup`) took."""
        if phase not in START_PHASES:
            raise ValueError(f"unknown start phase {phase!r}; expected one of {START_PHASES}")
        self.start_phase.labels(phase).set(seconds)

    def record_compile_cache(self, hits: int, misses: int) -> None:
        """Add compile-cache hits and misses (e.g. inductor's fxgraph_cache_hit / _miss counters)."""
        self.compile_cache.labels("hit").inc(hits)
        self.compile_cache.labels("miss").inc(misses)

    def session_started(self) -> None:
        """A session connected and was accepted."""
        self.sessions.inc()

    def error(self, code: str) -> None:
        """An `error` frame with this code was sent."""
        self.errors.labels(code).inc()

    def router(self) -> APIRouter:
        """`GET /metrics` serving this registry."""
        return metrics_router(self.registry)
