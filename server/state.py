"""What the gateway's routes share: the validated config, the worker pool, auth, metrics, recordings."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ServiceConfig
from server.auth import ApiKeyAuth
from server.metrics import GatewayMetrics
from server.pool import WorkerPool
from server.recording import RecordingStore


@dataclass
class GatewayState:
    config: ServiceConfig
    pool: WorkerPool
    auth: ApiKeyAuth
    metrics: GatewayMetrics
    recordings: RecordingStore
