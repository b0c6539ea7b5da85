"""One internal duplex WebSocket session on a worker (PROTOCOL.md §1 without queue messages, §3, §4).

A reader task turns frames into a queue; the session loop handles them strictly in arrival order and
sends exactly one reply per message that has one (exactly one `result` or `error` per
`audio_chunk`). Model work runs on the worker's single model thread (`executor`); the event loop
only does I/O. The deferred finalize of a unit is submitted to that thread right after its result is
sent, so the next unit's prefill, which is queued behind it, waits for it.

Terminal frames: `stopped` (after `stop`), `timeout` (pause expiry, idle limit, session duration,
context full) and a fatal `internal_error` (close 1011). The caller frees the session afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from common.config import ServiceConfig
from workers import protocol
from workers.engine.session import PromptTooLong
from workers.protocol import AudioChunk, PrepareRequest, ProtocolError, ResultCounters

log = logging.getLogger("workers.duplex_socket")

CLOSE_NORMAL = 1000
CLOSE_INTERNAL_ERROR = 1011


class SessionLike(Protocol):
    """The part of `workers.engine.session.DuplexSession` this module drives (docs/ARCHITECTURE.md)."""

    def prepare(
        self,
        system_prompt: str,
        settings: Any,
        ref_audio: np.ndarray | None,
        tts_ref_audio: np.ndarray | None,
    ) -> Any: ...
    def push_audio(self, samples: np.ndarray) -> None: ...
    def ready_units(self) -> int: ...
    def run_unit(
        self, frames: list[Image.Image], force_listen: bool = False, max_slice_nums: int | None = None
    ) -> Any: ...
    def finalize(self) -> None: ...
    def close(self) -> None: ...


class SessionObserver(Protocol):
    """What the worker wants to know about a session (health, metrics)."""

    def on_session_state(self, session_id: str, state: str, kv_cache_length: int) -> None: ...
    def on_unit(self, unit: Any, wall_ms: float) -> None: ...
    def on_finalize(self, seconds: float) -> None: ...
    def on_error_frame(self, code: str) -> None: ...


@dataclass
class _End:
    """Why the session loop stopped; `None` close code means the client already went away."""

    reason: str
    close_code: int | None


class DuplexSocketSession:
    """Runs one session over an accepted WebSocket until stop, timeout, error or disconnect."""

    def __init__(
        self,
        websocket: WebSocket,
        session_id: str,
        session: SessionLike,
        cfg: ServiceConfig,
        executor: Executor,
        observer: SessionObserver,
        default_voice: np.ndarray | None = None,
    ) -> None:
        self.websocket = websocket
        self.session_id = session_id
        self.session = session
        self.cfg = cfg
        self.executor = executor
        self.observer = observer
        self.default_voice = default_voice
        self._inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._prepared: PrepareRequest | None = None
        self._paused_until: float | None = None
        self._pause_timeout_s = cfg.duplex.pause_timeout_s
        self._force_listen_armed = False
        self._pending_frames: list[Image.Image] = []
        self._pending_finalize: asyncio.Future[None] | None = None
        self._chunk_index = 0
        self._counters = ResultCounters()
        self._started = time.monotonic()

    # -- public --------------------------------------------------------------------------------

    async def run(self) -> str:
        """Serve the session; returns the end reason (`stopped`, `pause_timeout`, `disconnect`, ...)."""
        reader = asyncio.create_task(self._read_frames())
        try:
            end = await self._serve()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        try:
            await self._wait_pending_finalize()
        except Exception:  # the session is over anyway; the model error is logged
            log.exception("session %s: finalize failed after the session ended", self.session_id)
        if end.close_code is not None and self.websocket.application_state == WebSocketState.CONNECTED:
            try:
                await self.websocket.close(end.close_code)
            except (RuntimeError, WebSocketDisconnect):
                pass
        return end.reason

    def detach_session(self) -> SessionLike:
        """Hand the engine session over for cleanup; this object keeps no reference to it."""
        session = self.session
        del self.session
        return session

    @property
    def paused(self) -> bool:
        return self._paused_until is not None

    # -- reading and the loop ------------------------------------------------------------------

    async def _read_frames(self) -> None:
        """Move every incoming frame to the inbox; `None` marks the end of the stream."""
        try:
            while True:
                frame = await self.websocket.receive()
                if frame["type"] == "websocket.disconnect":
                    break
                await self._inbox.put(frame)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            await self._inbox.put(None)

    def _wait_budget(self) -> tuple[float, str, str]:
        """Seconds until the next timeout, its code, and the text of its `timeout.reason`."""
        now = time.monotonic()
        limits = self.cfg.service.limits
        session_left = limits.max_session_s - (now - self._started)
        if self._paused_until is not None:
            pause_left = self._paused_until - now
            if pause_left <= session_left:
                return pause_left, "pause_timeout", f"Pause timeout ({self._pause_timeout_s:g}s)"
        elif limits.idle_timeout_s <= session_left:
            return limits.idle_timeout_s, "idle_timeout", f"Idle timeout ({limits.idle_timeout_s:g}s)"
        return session_left, "max_duration", f"Session reached its {limits.max_session_s:g}s limit"

    async def _serve(self) -> _End:
        while True:
            budget, code, reason = self._wait_budget()
            try:
                frame = await asyncio.wait_for(self._inbox.get(), timeout=max(budget, 0.0))
            except asyncio.TimeoutError:
                try:
                    await self._send({"type": "timeout", "reason": reason, "code": code})
                except (WebSocketDisconnect, RuntimeError):
                    return _End("disconnect", None)
                return _End(code, CLOSE_NORMAL)
            if frame is None:
                return _End("disconnect", None)
            try:
                end = await self._handle_frame(frame)
            except Exception:
                if self.websocket.application_state != WebSocketState.CONNECTED:
                    return _End("disconnect", None)
                end = await self._fail()
            if end is not None:
                return end

    async def _handle_frame(self, frame: dict[str, Any]) -> _End | None:
        if frame.get("text") is None:
            await self._send_error("binary_frame", "Binary frames are not supported; send JSON text frames")
            return None
        try:
            message = protocol.parse_text_frame(frame["text"])
        except ProtocolError as e:
            await self._send_error(e.code, e.message)
            return None
        kind = message["type"]
        if kind == "prepare":
            await self._on_prepare(message)
        elif kind == "audio_chunk":
            return await self._on_audio_chunk(message)
        elif kind == "pause":
            self._pause_timeout_s = protocol.parse_pause_timeout(message, self.cfg.duplex.pause_timeout_s)
            self._paused_until = time.monotonic() + self._pause_timeout_s
            self._report_state()
            await self._send({"type": "paused", "timeout": self._pause_timeout_s})
        elif kind == "resume":
            self._paused_until = None
            self._report_state()
            await self._send({"type": "resumed"})
        elif kind == "stop":
            await self._send({"type": "stopped"})
            return _End("stopped", CLOSE_NORMAL)
        elif kind == "interrupt":
            self._force_listen_armed = True
            await self._send({"type": "interrupted"})
        elif kind != "client_diagnostic":
            await self._send_error("unknown_type", f"Unknown message type: {kind}")
        return None

    # -- prepare -------------------------------------------------------------------------------

    async def _on_prepare(self, message: dict[str, Any]) -> None:
        if self._prepared is not None and not self.cfg.service.allow_reprepare:
            await self._send_error("already_prepared", "Session is already prepared")
            return
        try:  # off the event loop: decoding and resampling a reference clip takes a while
            request = await asyncio.to_thread(protocol.parse_prepare, message, self.cfg)
        except ProtocolError as e:
            await self._send_error(e.code, e.message)
            return
        ref_audio = request.ref_audio if request.ref_audio is not None else self.default_voice
        tts_ref_audio = request.tts_ref_audio if request.tts_ref_audio is not None else self.default_voice
        await self._wait_pending_finalize()
        try:
            prepared = await self._call_model(
                self.session.prepare, request.system_prompt, request.settings, ref_audio, tts_ref_audio
            )
        except PromptTooLong as e:  # the client's input, not a model failure: still unprepared, may retry
            self._prepared = None
            await self._send_error("invalid_config", f"system_prompt: {e}")
            return
        self._prepared = request
        # A (re-)prepare starts the session over: nothing buffered on this side survives it.
        self._counters = ResultCounters()
        self._pending_frames = []
        self._force_listen_armed = False
        reply: dict[str, Any] = {
            "type": "prepared",
            "prompt_length": prepared.prompt_length,
            "prompt_tokens": prepared.prompt_tokens,
            "session_id": self.session_id,
        }
        if request.warnings:
            reply["warnings"] = request.warnings
        self._counters.kv_cache_length = prepared.prompt_tokens
        self._report_state()
        await self._send(reply)

    # -- audio_chunk ---------------------------------------------------------------------------

    async def _on_audio_chunk(self, message: dict[str, Any]) -> _End | None:
        chunk_index = self._chunk_index
        self._chunk_index += 1
        received = time.perf_counter()
        if self.paused:
            await self._send_error("paused", "Worker is paused", chunk_index=chunk_index)
            return None
        if self._prepared is None:
            await self._send_error("not_prepared", "Send prepare before audio_chunk", chunk_index=chunk_index)
            return None
        try:
            chunk = protocol.parse_audio_chunk(message, self.cfg)
        except ProtocolError as e:
            await self._send_error(e.code, e.message, chunk_index=chunk_index)
            return None
        try:
            units = await self._run_chunk(chunk)
        except Exception:
            return await self._fail(chunk_index)
        wall_ms = (time.perf_counter() - received) * 1000.0
        result = protocol.build_result(
            units,
            self._counters,
            self._prepared.listen_audio,
            wall_ms,
            chunk.warnings,
            unit_ms=1000.0 * self.cfg.duplex.unit_chunk_samples / protocol.INPUT_SAMPLE_RATE,
        )
        for unit in units:
            self.observer.on_unit(unit, wall_ms / len(units))
        self._report_state()
        result["server_send_ts"] = time.time()
        await self._send(result)
        if units and self._prepared.deferred_finalize:
            self._pending_finalize = asyncio.ensure_future(self._finalize_timed())
        session_end = units[-1].session_end if units else None
        if session_end is not None:
            await self._send({"type": "timeout", "reason": "Context is full", "code": session_end})
            return _End(session_end, CLOSE_NORMAL)
        return None

    async def _run_chunk(self, chunk: AudioChunk) -> list[Any]:
        """Buffer the chunk's audio and run every complete unit (none for a short chunk, k for k seconds)."""
        self._pending_frames = (self._pending_frames + chunk.frames)[
            -self.cfg.service.limits.max_frames_per_chunk :
        ]
        self._force_listen_armed = self._force_listen_armed or chunk.force_listen
        await self._wait_pending_finalize()
        assert self._prepared is not None
        slices = chunk.max_slice_nums or self._prepared.max_slice_nums
        deferred = self._prepared.deferred_finalize
        units = await self._call_model(
            self._run_units_blocking,
            chunk.samples,
            self._pending_frames,
            self._force_listen_armed,
            slices,
            deferred,
        )
        if units:
            self._pending_frames = []
            self._force_listen_armed = False
        return units

    def _run_units_blocking(
        self,
        samples: np.ndarray,
        frames: list[Image.Image],
        force_listen: bool,
        max_slice_nums: int,
        deferred: bool,
    ) -> list[Any]:
        """On the model thread: push audio, run the ready units; frames go one per unit when they match
        the unit count, otherwise all to the first unit."""
        self.session.push_audio(samples)
        count = self.session.ready_units()
        units = []
        for index in range(count):
            if len(frames) == count > 1:
                unit_frames = [frames[index]]
            else:
                unit_frames = frames if index == 0 else []
            unit = self.session.run_unit(
                unit_frames, force_listen=force_listen, max_slice_nums=max_slice_nums
            )
            units.append(unit)
            if unit.session_end is not None:
                break  # the session is over; the remaining audio is not run
            if index < count - 1 or not deferred:
                self.session.finalize()
        return units

    async def _finalize_timed(self) -> None:
        started = time.perf_counter()
        await self._call_model(self.session.finalize)
        self.observer.on_finalize(time.perf_counter() - started)

    async def _wait_pending_finalize(self) -> None:
        pending, self._pending_finalize = self._pending_finalize, None
        if pending is not None:
            await pending

    async def _fail(self, chunk_index: int | None = None) -> _End:
        """A model or internal failure: fatal `internal_error`, then close 1011 (PROTOCOL.md §4 row 26)."""
        log.exception("session %s: internal error", self.session_id)
        try:
            await self._send_error(
                "internal_error",
                "Internal error while running the model; the session is closed",
                fatal=True,
                chunk_index=chunk_index,
            )
        except (WebSocketDisconnect, RuntimeError):
            return _End("internal_error", None)
        return _End("internal_error", CLOSE_INTERNAL_ERROR)

    # -- helpers -------------------------------------------------------------------------------

    async def _call_model(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _report_state(self) -> None:
        state = "duplex_paused" if self.paused else "duplex_active"
        self.observer.on_session_state(self.session_id, state, self._counters.kv_cache_length)

    async def _send(self, message: dict[str, Any]) -> None:
        await self.websocket.send_json(message)

    async def _send_error(
        self, code: str, message: str, fatal: bool = False, chunk_index: int | None = None
    ) -> None:
        self.observer.on_error_frame(code)
        await self._send(protocol.error_frame(code, message, fatal=fatal, chunk_index=chunk_index))
