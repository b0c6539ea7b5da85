"""The gateway's FastAPI application: both WebSocket protocols, HTTP routes, the worker pool.

The gateway never loads the model (nothing here imports torch); it queues sessions, assigns each to
one worker slot and relays or translates frames. Open routes: `/health`, the page (`/`, `/static/*`).
With API keys configured, everything else needs one (HTTP 401, WebSocket close 1008).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, WebSocket

from common.config import ServiceConfig
from common.worker_secret import worker_secret_headers
from server.auth import ApiKeyAuth
from server.legacy import serve_legacy
from server.metrics import GatewayMetrics
from server.pool import WorkerPool
from server.realtime import serve_realtime
from server.recording import RecordingStore
from server.routes_http import open_router, protected_router
from server.state import GatewayState
from server.web import web_router


def default_worker_urls(config: ServiceConfig, num_workers: int) -> list[str]:
    """`http://127.0.0.1:<worker_base_port + i>` for i < num_workers."""
    return [f"http://127.0.0.1:{config.service.worker_base_port + i}" for i in range(num_workers)]


def create_app(config: ServiceConfig, worker_urls: list[str]) -> FastAPI:
    """Build the gateway for these workers (base URLs, `http://host:port`)."""
    service = config.service
    metrics = GatewayMetrics()
    pool = WorkerPool(
        worker_urls,
        capacity=service.sessions_per_worker,
        max_queue_size=service.limits.max_queue_size,
        health_poll_s=service.health_poll_s,
        dead_after_s=service.worker_dead_after_s,
        worker_headers=worker_secret_headers(config.auth.worker_secret),
        on_worker_state=metrics.set_worker_state,
    )
    auth = ApiKeyAuth.from_config(config.auth)
    state = GatewayState(config=config, pool=pool, auth=auth, metrics=metrics,
                         recordings=RecordingStore(config.recording))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        try:
            yield
        finally:
            await pool.stop()

    app = FastAPI(title="omni-duplex gateway", lifespan=lifespan)
    app.state.gateway = state
    app.include_router(open_router)
    app.include_router(web_router())
    app.include_router(protected_router, dependencies=[Depends(auth)])
    app.include_router(metrics.router(dependencies=[Depends(auth)]))

    @app.websocket("/ws/duplex/{session_id}")
    async def legacy_duplex(websocket: WebSocket, session_id: str) -> None:
        await serve_legacy(websocket, session_id, state)

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        await serve_realtime(websocket, state)

    return app
