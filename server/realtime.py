"""Realtime v2 protocol (`/v1/realtime?mode=audio|video`, PROTOCOL.md §2) over the legacy worker protocol.

Client → worker: `session.init` becomes `prepare`, each `input.append` one `audio_chunk`,
`session.close` a `stop`. At most `MAX_CHUNKS_IN_FLIGHT` chunks are handed to the worker ahead of
its replies, so that a `session.close` can drop the input that has not run yet.

Worker → client: `prepared` becomes `session.created`; each speaking `result` becomes a text delta
(when it has text) and then an audio delta; a turn ends with exactly one `kind:"listen"` delta
(after the audio of the end-of-turn unit, or on the listening unit that closed a turn). Non-fatal
errors and per-chunk warnings become `session.warning` (the SDK treats every `error` as fatal);
fatal ones become `error` + `session.closed {reason:"error"}`. `response.done` is never sent.
A bad API key is answered with `error` `unauthorized` + 1008 before the session is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import deque
from typing import Any

from starlette.websockets import WebSocket

from server.admission import CancelledByClient, ClientLeft, HoldLimits, QueueVocabulary, Refused, admit
from server.auth import reject_websocket
from server.channels import ClientChannel, ClientFrame, WorkerGone, WorkerLink
from server.metrics import GatewayMetrics
from server.observer import SessionObserver
from server.pool import Assignment
from server.state import GatewayState

log = logging.getLogger("gateway.realtime")

MODES = {"audio": "audio_duplex", "video": "omni_duplex"}
MAX_CHUNKS_IN_FLIGHT = 2
OUTPUT_SAMPLE_RATE = 24000
# Positions a unit adds to the LLM cache besides vision: <unit>, 10 audio embeddings, </unit> (MODEL.md §3.3).
AUDIO_POSITIONS_PER_UNIT = 10
UNIT_MARKER_POSITIONS = 2
VISION_WRAP_POSITIONS = 2  # <image> … </image> or <slice> … </slice> around each 64-token block
TIMEOUT_REASONS = {"idle_timeout", "context_full", "max_duration"}

VOCABULARY = QueueVocabulary(
    protocol="realtime",
    queued=lambda view: {"type": "session.queued", **view},
    update=lambda view: {"type": "session.queue_update", **view},
    done={"type": "session.queue_done"},
    cancel_types=frozenset({"session.close"}),
)


def _warning(code: str, message: str) -> dict[str, Any]:
    return {"type": "session.warning", "code": code, "message": message}


def _closed(reason: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "session.closed", "reason": reason}
    if usage is not None:
        event["usage"] = usage
    return event


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"code": code, "message": message}}


async def _fail(channel: ClientChannel, code: str, message: str, close_code: int,
                usage: dict[str, Any] | None = None) -> None:
    """Fatal end of a v2 session: error, session.closed {reason: error}, close."""
    await channel.send_json(_error(code, message))
    await channel.send_json(_closed("error", usage))
    await channel.close(close_code, message)


async def serve_realtime(websocket: WebSocket, state: GatewayState) -> None:
    """Run one realtime v2 session from accept to close."""
    metrics = state.metrics
    check = state.auth.check_websocket(websocket)
    if not check.ok:
        metrics.error("unauthorized")
        await reject_websocket(websocket, check.subprotocol, _error("unauthorized", "Invalid or missing API key"))
        return
    await websocket.accept(subprotocol=check.subprotocol)
    channel = ClientChannel(websocket)
    mode = websocket.query_params.get("mode") or "video"
    if mode not in MODES:
        metrics.error("invalid_mode")
        await _fail(channel, "invalid_mode", f"Invalid mode {mode!r}: use audio or video", 1008)
        return
    session_id = "rt_" + secrets.token_hex(8)
    limits = state.config.service.limits
    try:
        admission = await admit(
            state.pool, channel, session_id, MODES[mode], VOCABULARY, metrics,
            hold=HoldLimits.of(limits), enabled_types=state.config.service.session_types,
        )
    except Refused as exc:
        metrics.error(exc.code)
        await _fail(channel, exc.code, exc.message, exc.close_code)
        return
    except CancelledByClient as exc:
        await channel.send_json(_closed(_close_reason(exc.frame.message)))
        await channel.close(1000)
        return
    except ClientLeft:
        await channel.close(1000)
        return

    assignment = admission.assignment
    observer = SessionObserver(metrics, state.recordings, assignment, VOCABULARY.protocol)
    try:
        link = await WorkerLink.connect(assignment.worker_ws_url(), limits.max_message_bytes,
                                        state.pool.worker_headers)
    except WorkerGone as exc:
        log.warning("session %s: worker %d unreachable: %s", session_id, assignment.worker.index, exc)
        state.pool.release(assignment)
        observer.end("worker_failed")
        metrics.error("worker_failed")
        await _fail(channel, "worker_failed", "The worker serving this session failed", 1011)
        return
    bridge = RealtimeBridge(channel, link, session_id, mode, observer, metrics, HoldLimits.of(limits))
    try:
        await bridge.run(assignment, admission.held)
    finally:
        await link.close()
        state.pool.release(assignment)
        observer.end(bridge.end_reason)
        await channel.close(1000)


def _close_reason(message: dict[str, Any] | None) -> str:
    reason = (message or {}).get("reason")
    return reason if isinstance(reason, str) and reason else "user_stop"


class RealtimeBridge:
    """Translation state of one realtime session once it has a worker."""

    def __init__(self, channel: ClientChannel, link: WorkerLink, session_id: str, mode: str,
                 observer: SessionObserver, metrics: GatewayMetrics, hold: HoldLimits) -> None:
        self.channel = channel
        # Appends wait in pending_chunks before session.created and while MAX_CHUNKS_IN_FLIGHT are
        # unanswered; the queue's hold limits bound them.
        self.hold = hold
        self.pending_bytes = 0
        self.link = link
        self.session_id = session_id
        self.mode = mode
        self.observer = observer
        self.metrics = metrics
        self.end_reason = "client_left"  # the session.closed reason once one was sent
        self.init_sent = False
        self.created = False
        self.close_reason: str | None = None
        self.pending_chunks: deque[tuple[dict[str, Any], int]] = deque()  # (chunk, its frame's size)
        self.in_flight = 0
        self.chunks_answered = 0
        self.frames_warned = False
        self.in_turn = False
        self.turns = 0
        self.prompt_tokens = 0
        self.audio_in_tokens = 0
        self.vision_in_tokens = 0
        self.other_in_tokens = 0
        self.text_out_tokens = 0
        self.audio_out_tokens = 0
        self._send_lock = asyncio.Lock()

    async def run(self, assignment: Assignment, held: list[ClientFrame]) -> None:
        """Relay until the session ends; every way out sends the terminal frames itself."""
        client_pump = asyncio.create_task(self._client_loop(held))
        worker_pump = asyncio.create_task(self._worker_loop())
        lost = asyncio.create_task(assignment.worker_lost.wait())
        try:
            done, _ = await asyncio.wait({client_pump, worker_pump, lost}, return_when=asyncio.FIRST_COMPLETED)
            errors = [task.exception() for task in done if task is not lost and task.exception() is not None]
            if lost in done or any(isinstance(error, WorkerGone) for error in errors):
                log.warning("session %s: worker failed: %s", self.session_id, errors or "no health answer")
                await self._fail("worker_failed", "The worker serving this session failed")
            elif errors:
                log.error("session %s: relay failed", self.session_id, exc_info=errors[0])
                await self._fail("internal_error", "Internal gateway error")
        finally:
            for task in (client_pump, worker_pump, lost):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # handled above
                    await task

    # ---- client → worker -----------------------------------------------------------------------

    async def _client_loop(self, held: list[ClientFrame]) -> None:
        for frame in held:
            await self._on_client_frame(frame)
        while (frame := await self.channel.next()) is not None:
            await self._on_client_frame(frame)

    async def _on_client_frame(self, frame: ClientFrame) -> None:
        if self.close_reason is not None:
            return  # after session.close: nothing more is answered
        if isinstance(frame.raw, bytes):
            await self.channel.send_json(_warning("binary_frame", "Binary frames are not supported; send JSON text"))
            return
        if frame.json_error:
            await self.channel.send_json(_warning("bad_json", "Message is not valid JSON"))
            return
        if frame.type is None:
            await self.channel.send_json(_warning("bad_message", "Message must be a JSON object with a string 'type'"))
            return
        message = frame.message or {}
        if frame.type == "session.init":
            await self._on_init(message)
        elif frame.type == "input.append":
            await self._on_append(message, frame.size)
        elif frame.type == "session.close":
            self.close_reason = _close_reason(message)
            self.pending_chunks.clear()
            self.pending_bytes = 0
            await self._send_to_worker({"type": "stop"})
        else:
            await self.channel.send_json(_warning("unknown_type", f"Unknown message type: {frame.type}"))

    async def _on_init(self, message: dict[str, Any]) -> None:
        if self.init_sent:
            await self.channel.send_json(_warning("already_prepared", "session.init was already received"))
            return
        self.init_sent = True
        await self._send_to_worker(prepare_from_init(message))

    async def _on_append(self, message: dict[str, Any], size: int) -> None:
        try:
            self.hold.check(len(self.pending_chunks) + 1, self.pending_bytes + size,
                            "input.append messages waiting for the worker")
        except Refused as exc:
            self.close_reason = exc.code  # nothing more is answered
            self.pending_chunks.clear()
            await self._fail(exc.code, exc.message, exc.close_code)
            return
        body = message.get("input") if isinstance(message.get("input"), dict) else {}
        fields = {**message, **body}
        chunk: dict[str, Any] = {"type": "audio_chunk"}
        audio = fields.get("audio", fields.get("audio_base64"))
        if audio is not None:
            chunk["audio_base64"] = audio
        for key in ("force_listen", "max_slice_nums"):
            if key in fields:
                chunk[key] = fields[key]
        frames = fields.get("video_frames")
        if frames:
            if self.mode == "video":
                chunk["frame_base64_list"] = frames
            elif not self.frames_warned:
                self.frames_warned = True
                await self.channel.send_json(_warning("frames_ignored", "video_frames are ignored in mode=audio"))
        self.pending_chunks.append((chunk, size))
        self.pending_bytes += size
        await self._pump_chunks()

    async def _pump_chunks(self) -> None:
        """Hand queued chunks to the worker, keeping at most MAX_CHUNKS_IN_FLIGHT unanswered."""
        async with self._send_lock:
            while self.created and self.pending_chunks and self.in_flight < MAX_CHUNKS_IN_FLIGHT:
                chunk, size = self.pending_chunks.popleft()
                self.pending_bytes -= size
                self.in_flight += 1
                await self.link.send_json(chunk)
                self.observer.to_worker(chunk)

    async def _send_to_worker(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.link.send_json(message)
        self.observer.to_worker(message)

    # ---- worker → client -----------------------------------------------------------------------

    async def _worker_loop(self) -> None:
        while True:
            try:
                raw = await self.link.recv()
            except WorkerGone as exc:
                if exc.close_code == 1000 and self.close_reason is not None:
                    await self._finish(self.close_reason)
                    return
                raise
            message = json.loads(raw)
            self.observer.from_worker(message)
            kind = message.get("type")
            if kind == "prepared":
                await self._on_prepared(message)
            elif kind == "result":
                await self._on_result(message)
            elif kind == "error":
                if await self._on_error(message):
                    return
            elif kind == "timeout":
                code = message.get("code")
                await self._finish(code if code in TIMEOUT_REASONS else "timeout")
                return
            elif kind == "stopped":
                await self._finish(self.close_reason or "user_stop")
                return

    async def _finish(self, reason: str) -> None:
        self.end_reason = reason
        await self.channel.send_json(_closed(reason, self.usage()))
        await self.channel.close(1000)

    async def _fail(self, code: str, message: str, close_code: int = 1011, gateway_error: bool = True) -> None:
        """Fatal end with usage; `gateway_error` counts errors the gateway itself raised (worker errors
        are counted as they arrive)."""
        self.end_reason = code
        if gateway_error:
            self.metrics.error(code)
        await _fail(self.channel, code, message, close_code, self.usage() if self.created else None)

    async def _on_prepared(self, message: dict[str, Any]) -> None:
        self.created = True
        self.prompt_tokens = int(message.get("prompt_tokens") or 0)
        await self.channel.send_json({
            "type": "session.created",
            "session_id": self.session_id,
            "prompt_length": message.get("prompt_length"),
            "prompt_tokens": message.get("prompt_tokens"),
        })
        for warning in message.get("warnings") or []:
            await self._send_worker_warning(warning)
        await self._pump_chunks()

    async def _on_error(self, message: dict[str, Any]) -> bool:
        """Translate a worker error; returns True when it ended the session."""
        code = message.get("code") or "error"
        text = message.get("message") or message.get("error") or "error"
        if not self.created:
            # prepare failed (bad ref audio, invalid config): v2 has no retry, the session is over
            await self._fail(code, text, 1011 if message.get("fatal") else 1000, gateway_error=False)
            return True
        if message.get("fatal"):
            await self._fail(code, text, gateway_error=False)
            return True
        self._chunk_answered()
        await self.channel.send_json(_warning(code, text))
        await self._pump_chunks()
        return False

    def _chunk_answered(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.chunks_answered += 1

    async def _on_result(self, result: dict[str, Any]) -> None:
        chunk_index = self.chunks_answered
        self._chunk_answered()
        for warning in result.get("warnings") or []:
            await self._send_worker_warning(warning)
        if not result.get("buffered"):
            self._count_usage(result)
            await self._emit_unit_output(result, chunk_index)
        await self._pump_chunks()

    async def _emit_unit_output(self, result: dict[str, Any], chunk_index: int) -> None:
        end_of_turn = bool(result.get("end_of_turn"))
        if not result.get("is_listen"):
            self.in_turn = True
            response_id = f"resp_{self.turns + 1}"
            text = result.get("text")
            if text:
                await self.channel.send_json({
                    "type": "response.output.delta", "kind": "text", "text": text,
                    "end_of_turn": end_of_turn, "response_id": response_id,
                })
            audio = result.get("audio_data")
            if audio:
                await self.channel.send_json({
                    "type": "response.output.delta", "kind": "audio", "audio": audio,
                    "sample_rate": OUTPUT_SAMPLE_RATE, "format": "float32le", "end_of_turn": end_of_turn,
                    "response_id": response_id, "chunk_index": chunk_index,
                })
        if self.in_turn and (end_of_turn or result.get("is_listen")):
            self.in_turn = False
            self.turns += 1
            await self.channel.send_json({
                "type": "response.output.delta", "kind": "listen", "text": "", "usage": self.usage(),
            })

    async def _send_worker_warning(self, warning: Any) -> None:
        if isinstance(warning, dict):
            await self.channel.send_json(_warning(str(warning.get("code", "warning")), str(warning.get("message", ""))))

    # ---- usage -----------------------------------------------------------------------------------

    def _count_usage(self, result: dict[str, Any]) -> None:
        units = int(result.get("units", 1) or 0)
        self.audio_in_tokens += units * AUDIO_POSITIONS_PER_UNIT
        self.vision_in_tokens += int(result.get("vision_tokens") or 0)
        self.other_in_tokens += (units * UNIT_MARKER_POSITIONS
                                 + int(result.get("vision_slices") or 0) * VISION_WRAP_POSITIONS)
        self.text_out_tokens += int(result.get("n_tokens") or 0)
        self.audio_out_tokens += int(result.get("n_tts_tokens") or 0)

    def usage(self) -> dict[str, Any]:
        """Cumulative usage snapshot (never decreases; KV eviction does not affect it)."""
        input_tokens = self.prompt_tokens + self.audio_in_tokens + self.vision_in_tokens + self.other_in_tokens
        output_tokens = self.text_out_tokens + self.audio_out_tokens
        return {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"audio_tokens": self.audio_in_tokens, "vision_tokens": self.vision_in_tokens},
            "output_tokens_details": {"audio_tokens": self.audio_out_tokens},
        }


def prepare_from_init(message: dict[str, Any]) -> dict[str, Any]:
    """Legacy `prepare` for a v2 `session.init` (PROTOCOL.md §2.3)."""
    payload = message.get("payload") if isinstance(message.get("payload"), dict) else {}
    prepare: dict[str, Any] = {"type": "prepare"}
    if isinstance(payload.get("system_prompt"), str):
        prepare["system_prompt"] = payload["system_prompt"]
    config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    settings = {key: value for key, value in config.items() if key not in ("tts_enabled", "vision_hd")}
    if "tts_enabled" in config:
        settings["generate_audio"] = config["tts_enabled"]
    prepare["config"] = settings
    voice = payload.get("voice") if isinstance(payload.get("voice"), dict) else {}
    for key in ("ref_audio_base64", "tts_ref_audio_base64"):
        if voice.get(key):
            prepare[key] = voice[key]
    if "max_slice_nums" in payload:
        prepare["max_slice_nums"] = payload["max_slice_nums"]
    elif config.get("vision_hd") is True:
        prepare["max_slice_nums"] = 2
    return prepare
