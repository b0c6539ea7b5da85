"""Prometheus pieces shared by the gateway's and the workers' metrics (no torch).

Each side keeps its own `CollectorRegistry`; these helpers only build on one.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, Response
from fastapi.params import Depends
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest


class StateGauge:
    """A gauge labelled by state: 1 for the current state of each subject, 0 for states it has left.

    `subject_labels` name what has a state (e.g. `("worker",)`); empty for a single subject.
    """

    def __init__(
        self, name: str, documentation: str, subject_labels: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.gauge = Gauge(name, documentation, (*subject_labels, "state"), registry=registry)
        self._current: dict[tuple[str, ...], str] = {}

    def set(self, state: str, *subject: str) -> None:
        """Record `state` as the current state of `subject` (the values of `subject_labels`)."""
        previous = self._current.get(subject)
        if previous is not None and previous != state:
            self.gauge.labels(*subject, previous).set(0)
        self.gauge.labels(*subject, state).set(1)
        self._current[subject] = state


def metrics_router(registry: CollectorRegistry, dependencies: Sequence[Depends] = ()) -> APIRouter:
    """`GET /metrics` serving `registry` in the Prometheus text format, behind `dependencies` if any."""
    router = APIRouter(dependencies=list(dependencies))

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(content=generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
