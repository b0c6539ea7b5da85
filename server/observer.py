"""What the gateway notes about a session that has a worker: metrics and the optional recording.

Both protocol adapters report here every message they send to the worker and every message the
worker sends back (internal protocol, parsed), and how the session ended.
"""

from __future__ import annotations

from typing import Any

from server.metrics import GatewayMetrics
from server.pool import Assignment
from server.recording import RecordingStore


class SessionObserver:
    """Metrics and recording of one assigned session, from assignment to `end()`."""

    def __init__(self, metrics: GatewayMetrics, recordings: RecordingStore, assignment: Assignment,
                 protocol: str) -> None:
        self.metrics = metrics
        self.kind = assignment.kind
        self.protocol = protocol
        self.recorder = recordings.open(assignment.session_id, assignment.kind, protocol, assignment.worker.url)
        metrics.session_started(self.kind, protocol)

    def to_worker(self, message: dict[str, Any] | None) -> None:
        """A message the gateway handed to the worker."""
        if self.recorder is not None:
            self.recorder.to_worker(message)

    def from_worker(self, message: dict[str, Any] | None) -> None:
        """A message from the worker: results feed the unit metrics, errors the error counts."""
        if not message:
            return
        if message.get("type") == "result":
            self.metrics.observe_unit(message)
        elif message.get("type") == "error":
            self.metrics.error(str(message.get("code") or "error"))
        if self.recorder is not None:
            self.recorder.from_worker(message)

    def end(self, reason: str) -> None:
        """The session is over (any reason); call exactly once."""
        self.metrics.session_ended(self.kind, self.protocol)
        if self.recorder is not None:
            self.recorder.close(reason)
