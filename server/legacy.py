"""Legacy duplex protocol (`/ws/duplex/{session_id}`, PROTOCOL.md §1) — the gateway side.

The worker speaks this same protocol without queue messages, so after admission the adapter is a
relay: client frames go to the worker unchanged (bad frames included: the worker answers them,
§4), except `client_diagnostic`, which the gateway consumes. Worker frames go to the client
unchanged; `stopped`/`timeout` end the session with 1000, a fatal `error` with 1011. If the
worker's socket drops without such a frame, the client gets `error` `worker_failed` + 1011.
A bad API key is answered with `error` `unauthorized` + 1008 before the session is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import Any

from starlette.websockets import WebSocket

from server.admission import CancelledByClient, ClientLeft, HoldLimits, QueueVocabulary, Refused, admit
from server.auth import reject_websocket
from server.channels import ClientChannel, ClientFrame, WorkerGone, WorkerLink
from server.observer import SessionObserver
from server.pool import Assignment
from server.queue import SessionKind
from server.state import GatewayState

log = logging.getLogger("gateway.legacy")

MAX_SESSION_ID_CHARS = 128
DIAGNOSTIC_LOG_CHARS = 2000

VOCABULARY = QueueVocabulary(
    protocol="legacy",
    queued=lambda view: {"type": "queued", **view},
    update=lambda view: {"type": "queue_update", **view},
    done={"type": "queue_done"},
    cancel_types=frozenset({"stop"}),
    consumed_types=frozenset({"client_diagnostic"}),
)


def sanitize_session_id(raw: str) -> str:
    """Keep [A-Za-z0-9_-], at most 128 characters (PROTOCOL.md §1.1)."""
    return re.sub(r"[^A-Za-z0-9_-]", "", raw)[:MAX_SESSION_ID_CHARS]


def session_kind(session_id: str) -> SessionKind:
    return "audio_duplex" if session_id.startswith("adx_") else "omni_duplex"


def error_frame(code: str, message: str, *, fatal: bool) -> dict[str, Any]:
    """A legacy `error`: `error` is the text clients read; code/message/fatal are ours."""
    return {"type": "error", "error": message, "code": code, "message": message, "fatal": fatal}


async def serve_legacy(websocket: WebSocket, raw_session_id: str, state: GatewayState) -> None:
    """Run one legacy duplex session from accept to close."""
    check = state.auth.check_websocket(websocket)
    if not check.ok:
        state.metrics.error("unauthorized")
        message = "Invalid or missing API key"
        await reject_websocket(websocket, check.subprotocol, error_frame("unauthorized", message, fatal=True))
        return
    await websocket.accept(subprotocol=check.subprotocol)
    session_id = sanitize_session_id(raw_session_id) or "session"
    channel = ClientChannel(websocket)
    limits = state.config.service.limits
    try:
        admission = await admit(
            state.pool, channel, session_id, session_kind(session_id), VOCABULARY, state.metrics,
            hold=HoldLimits.of(limits), enabled_types=state.config.service.session_types,
        )
    except Refused as exc:
        state.metrics.error(exc.code)
        await channel.send_json(error_frame(exc.code, exc.message, fatal=True))
        await channel.close(exc.close_code, exc.message)
        return
    except CancelledByClient:
        await channel.send_json({"type": "stopped"})
        await channel.close(1000, "stopped")
        return
    except ClientLeft:
        log.info("session %s left the queue", session_id)
        await channel.close(1000)
        return

    assignment = admission.assignment
    observer = SessionObserver(state.metrics, state.recordings, assignment, VOCABULARY.protocol)
    link: WorkerLink | None = None
    close_code, end_reason = 1000, "client_left"
    try:
        link = await WorkerLink.connect(assignment.worker_ws_url(), limits.max_message_bytes,
                                        state.pool.worker_headers)
        close_code, end_reason = await _relay(channel, link, assignment, admission.held, observer)
    except WorkerGone as exc:
        log.warning("session %s: worker %d failed: %s", session_id, assignment.worker.index, exc)
        state.metrics.error("worker_failed")
        await channel.send_json(error_frame("worker_failed", "The worker serving this session failed", fatal=True))
        close_code, end_reason = 1011, "worker_failed"
    finally:
        await channel.close(close_code)  # the client first: closing the worker link may wait on the worker
        if link is not None:
            await link.close()
        state.pool.release(assignment)
        observer.end(end_reason)


async def _relay(channel: ClientChannel, link: WorkerLink, assignment: Assignment, held: list[ClientFrame],
                 observer: SessionObserver) -> tuple[int, str]:
    """Pump both directions until the session ends; returns the client's close code and the end reason."""
    client_pump = asyncio.create_task(_client_to_worker(channel, link, held, assignment.session_id, observer))
    worker_pump = asyncio.create_task(_worker_to_client(link, channel, observer))
    lost = asyncio.create_task(assignment.worker_lost.wait())
    try:
        done, _ = await asyncio.wait({client_pump, worker_pump, lost}, return_when=asyncio.FIRST_COMPLETED)
        if worker_pump in done:
            return worker_pump.result()
        if lost in done:
            raise WorkerGone("worker stopped answering health checks")
        client_pump.result()  # re-raise WorkerGone from a failed send
        return 1000, "client_left"  # the finally block of serve_legacy closes the worker socket
    finally:
        for task in (client_pump, worker_pump, lost):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, WorkerGone):
                await task


async def _client_to_worker(channel: ClientChannel, link: WorkerLink, held: list[ClientFrame], session_id: str,
                            observer: SessionObserver) -> None:
    """Forward held frames, then live ones, in order. Returns when the client disconnects."""
    for frame in held:
        await _forward(frame, link, session_id, observer)
    while (frame := await channel.next()) is not None:
        await _forward(frame, link, session_id, observer)


async def _forward(frame: ClientFrame, link: WorkerLink, session_id: str, observer: SessionObserver) -> None:
    if frame.type == "client_diagnostic":
        log.info("client_diagnostic %s: %s", session_id, json.dumps(frame.message)[:DIAGNOSTIC_LOG_CHARS])
        return
    await link.send(frame.raw)
    observer.to_worker(frame.message)


async def _worker_to_client(link: WorkerLink, channel: ClientChannel, observer: SessionObserver) -> tuple[int, str]:
    """Relay worker frames; returns the client close code and end reason once the worker ends the session."""
    while True:
        try:
            raw = await link.recv()
        except WorkerGone as exc:
            if exc.close_code == 1000:
                return 1000, "worker_closed"
            raise
        await channel.send_text(raw)
        message = _parse_object(raw)
        observer.from_worker(message)
        kind = message.get("type") if message else None
        if kind == "stopped":
            return 1000, "stopped"
        if kind == "timeout":
            return 1000, str(message.get("code") or "timeout")
        if kind == "error" and message.get("fatal"):
            return 1011, str(message.get("code") or "error")


def _parse_object(raw: str) -> dict[str, Any] | None:
    """A worker frame as a dict, or None when it is not a JSON object."""
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return message if isinstance(message, dict) else None
