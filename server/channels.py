"""Both ends of a relayed session: the client's WebSocket and the internal link to a worker.

`ClientChannel` reads the client socket in a background task so that a session can wait for a
worker (or for the worker's replies) while still noticing client messages and disconnects.
`WorkerLink` is the gateway's connection to a worker's internal `/ws/duplex` endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import websockets
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from websockets.asyncio.client import ClientConnection

log = logging.getLogger("gateway.channels")

WORKER_CONNECT_TIMEOUT_S = 10.0
WORKER_CLOSE_TIMEOUT_S = 2.0


@dataclass
class ClientFrame:
    """One message from the client, parsed once. `message` is None unless it is a JSON object."""

    raw: str | bytes
    message: dict[str, Any] | None
    json_error: bool  # a text frame that is not valid JSON

    @classmethod
    def parse(cls, raw: str | bytes) -> ClientFrame:
        if isinstance(raw, bytes):
            return cls(raw, None, False)
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):  # ValueError: bad JSON or an integer over 4300 digits
            return cls(raw, None, True)
        return cls(raw, value if isinstance(value, dict) else None, False)

    @property
    def type(self) -> str | None:
        kind = self.message.get("type") if self.message else None
        return kind if isinstance(kind, str) else None

    @property
    def size(self) -> int:
        return len(self.raw)


class ClientChannel:
    """The client's WebSocket: frames are read ahead into a queue; `next()` returns None on disconnect."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self._inbox: asyncio.Queue[ClientFrame | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                self._inbox.put_nowait(ClientFrame.parse(raw if raw is not None else message.get("bytes") or b""))
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self._inbox.put_nowait(None)

    async def next(self) -> ClientFrame | None:
        """The next client frame in arrival order, or None once the client is gone."""
        frame = await self._inbox.get()
        if frame is None:
            self._inbox.put_nowait(None)  # keep reporting the disconnect to later callers
        return frame

    @property
    def open(self) -> bool:
        return (
            self.websocket.client_state == WebSocketState.CONNECTED
            and self.websocket.application_state == WebSocketState.CONNECTED
        )

    async def send_json(self, payload: dict[str, Any]) -> None:
        await self.send_text(json.dumps(payload, ensure_ascii=False))

    async def send_text(self, text: str) -> None:
        """Send unless the client is already gone (its disconnect is reported by next())."""
        if not self.open:
            return
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await self.websocket.send_text(text)

    async def close(self, code: int, reason: str = "") -> None:
        if self.open:
            with contextlib.suppress(RuntimeError, OSError):
                await self.websocket.close(code=code, reason=reason[:120])
        self._reader.cancel()
        # The reader's own failure, if any, must not stop the caller's clean-up (worker link, pool slot).
        outcome = (await asyncio.gather(self._reader, return_exceptions=True))[0]
        if isinstance(outcome, Exception):
            log.error("client reader failed", exc_info=outcome)


class WorkerGone(Exception):
    """The worker's socket closed or could not be opened."""

    def __init__(self, detail: str, close_code: int | None = None) -> None:
        super().__init__(detail)
        self.close_code = close_code


class WorkerLink:
    """The gateway's WebSocket to one worker session (internal protocol = legacy without queue)."""

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection

    @classmethod
    async def connect(cls, url: str, max_message_bytes: int, headers: dict[str, str] | None = None) -> WorkerLink:
        """Open the worker socket; `headers` carry the worker secret when one is configured."""
        try:
            connection = await websockets.connect(
                url,
                additional_headers=headers,
                max_size=max_message_bytes,
                open_timeout=WORKER_CONNECT_TIMEOUT_S,
                compression=None,
                ping_interval=20,
                ping_timeout=60,
                close_timeout=WORKER_CLOSE_TIMEOUT_S,
            )
        except (OSError, asyncio.TimeoutError, websockets.WebSocketException) as exc:
            raise WorkerGone(f"cannot reach worker at {url}: {exc}") from exc
        return cls(connection)

    async def send(self, raw: str | bytes) -> None:
        try:
            await self._connection.send(raw)
        except websockets.ConnectionClosed as exc:
            raise WorkerGone("worker closed the connection", exc.rcvd.code if exc.rcvd else None) from exc

    async def send_json(self, payload: dict[str, Any]) -> None:
        await self.send(json.dumps(payload))

    async def recv(self) -> str:
        """Next text frame from the worker; raises WorkerGone when its socket closes."""
        try:
            raw = await self._connection.recv()
        except websockets.ConnectionClosed as exc:
            raise WorkerGone("worker closed the connection", exc.rcvd.code if exc.rcvd else None) from exc
        return raw if isinstance(raw, str) else raw.decode("utf-8", errors="replace")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._connection.close()
