"""Command-line client: stream a media file to the gateway and save the spoken reply.

    python -m clients --url ws://localhost:8006 --input talk.mp4 [--protocol legacy|realtime]
                      [--audio-only] [--fast] [--out reply.wav] [--session-id ID] [--api-key KEY]
                      [--system-prompt TEXT]

The input (MP4 or any audio file) is decoded by `workers.media.load_media` (ffmpeg-python; no torch)
into 1 s chunks of 16 kHz float32 plus one JPEG per second, and sent at real-time pace (or as fast
as the server answers with `--fast`). Text goes to stdout as it arrives, status to stderr; the
speech of speaking units is written to a 24 kHz mono WAV; latency statistics are printed at the end.

Legacy protocol (PROTOCOL.md §1) is used lock-step: send a chunk, read its `result`. Latency is the
time from sending a chunk to receiving its result. Realtime v2 (§2) is free-running; latency is
measured for audio deltas that carry `chunk_index` (from sending that chunk to the delta's arrival).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
import wave
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from workers.media import MediaClip, MediaError, load_media

INPUT_RATE = 16_000
OUTPUT_RATE = 24_000
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
REPLY_TIMEOUT_S = 120.0  # longest wait for any single server reply
CLOSE_TIMEOUT_S = 10.0


class ClientError(RuntimeError):
    """The server refused or ended the session; the message says how."""


@dataclass
class ClientOptions:
    """What to send and where (the command line, as data)."""

    url: str
    input: Path
    protocol: str = "legacy"
    audio_only: bool = False
    fast: bool = False
    out: Path | None = None
    session_id: str | None = None
    api_key: str | None = None
    system_prompt: str = "You are a helpful assistant."
    drain_s: float = 3.0


@dataclass
class SessionReport:
    """What came back from one session."""

    latencies_s: list[float] = field(default_factory=list)
    server_wall_clock_ms: list[float] = field(default_factory=list)
    speech: list[np.ndarray] = field(default_factory=list)
    text: str = ""
    units: int = 0
    speak_units: int = 0
    turns: int = 0
    errors: list[str] = field(default_factory=list)

    def speech_samples(self) -> np.ndarray:
        return np.concatenate(self.speech) if self.speech else np.zeros(0, dtype=np.float32)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, int(np.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


def latency_summary(latencies_s: list[float]) -> dict[str, float | int]:
    """count, p50, p95 and max of the per-unit latencies, in milliseconds."""
    if not latencies_s:
        return {"count": 0}
    ms = [x * 1000.0 for x in latencies_s]
    return {"count": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "max_ms": max(ms)}


def encode_pcm(samples: np.ndarray) -> str:
    return base64.b64encode(np.asarray(samples, dtype="<f4").tobytes()).decode("ascii")


def decode_pcm(text: str) -> np.ndarray:
    raw = base64.b64decode(text)
    return np.frombuffer(raw[: len(raw) - len(raw) % 4], dtype="<f4").astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = OUTPUT_RATE) -> None:
    """Write float samples as 16-bit PCM mono WAV."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())


def default_session_id(audio_only: bool) -> str:
    """`adx_` (audio-only) or `omni_` plus the time in base 36, like the browser page."""
    millis, digits = int(time.time() * 1000), ""
    while millis:
        millis, rest = divmod(millis, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[rest] + digits
    return ("adx_" if audio_only else "omni_") + digits


def websocket_base(url: str) -> str:
    """The gateway's base URL with an ws:// or wss:// scheme and no trailing slash."""
    parts = urlsplit(url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"--url must start with ws://, wss://, http:// or https://, got {url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path, "", ""))


class Printer:
    """Transcript to stdout as it arrives; status lines to stderr."""

    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.out, self.err = out, err
        self.mid_line = False

    def text(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.mid_line = True

    def end_turn(self) -> None:
        if self.mid_line:
            self.out.write("\n")
            self.out.flush()
            self.mid_line = False

    def status(self, line: str) -> None:
        self.err.write(f"[client] {line}\n")
        self.err.flush()


async def _receive(ws: ClientConnection, timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), timeout_s)
    message = json.loads(frame)
    if not isinstance(message, dict):
        raise ClientError(f"server sent a non-object frame: {frame[:200]!r}")
    return message


def _error_text(message: dict[str, Any]) -> str:
    error = message.get("error")
    if isinstance(error, dict):  # realtime v2: {"code", "message"}
        return f"{error.get('code')}: {error.get('message')}"
    return f"{message.get('code', 'error')}: {error or message.get('message')}"


async def _wait_for_queue(ws: ClientConnection, printer: Printer, prefix: str) -> None:
    """Read queue messages until `queue_done` (legacy) / `session.queue_done` (realtime)."""
    while True:
        message = await _receive(ws)
        kind = message.get("type", "")
        if kind in (f"{prefix}queue_done", "queue_done"):
            return
        if kind in (f"{prefix}queued", f"{prefix}queue_update"):
            printer.status(f"queued: position {message.get('position')} of {message.get('queue_length')}, "
                           f"about {message.get('estimated_wait_s')} s")
        elif kind in ("error", "session.closed"):
            raise ClientError(f"refused while queued: {_error_text(message)}")


class _Pacer:
    """Sleeps so that chunk i is sent i seconds (of audio) after the first; no-op with --fast."""

    def __init__(self, fast: bool) -> None:
        self.fast = fast
        self.start = time.monotonic()
        self.audio_s = 0.0

    async def wait_turn(self, chunk_samples: int) -> None:
        if not self.fast:
            await asyncio.sleep(max(0.0, self.start + self.audio_s - time.monotonic()))
        self.audio_s += chunk_samples / INPUT_RATE


def _chunk_frames(clip: MediaClip, index: int, audio_only: bool) -> list[str]:
    if audio_only or index >= len(clip.frames):
        return []
    return [base64.b64encode(clip.frames[index]).decode("ascii")]


async def run_legacy(ws: ClientConnection, opts: ClientOptions, clip: MediaClip, printer: Printer) -> SessionReport:
    """One lock-step legacy session on an open socket: prepare, one result per chunk, stop."""
    report = SessionReport()
    await _wait_for_queue(ws, printer, prefix="")
    await ws.send(json.dumps({"type": "prepare", "system_prompt": opts.system_prompt}))
    prepared = await _receive(ws)
    if prepared.get("type") != "prepared":
        raise ClientError(f"prepare failed: {_error_text(prepared)}")
    printer.status(f"prepared (prompt {prepared.get('prompt_length')} chars)")

    pacer = _Pacer(opts.fast)
    for index, chunk in enumerate(clip.audio_chunks):
        await pacer.wait_turn(len(chunk))
        message: dict[str, Any] = {"type": "audio_chunk", "audio_base64": encode_pcm(chunk)}
        frames = _chunk_frames(clip, index, opts.audio_only)
        if frames:
            message["frame_base64_list"] = frames
        sent_at = time.monotonic()
        await ws.send(json.dumps(message))
        reply = await _receive(ws)
        kind = reply.get("type")
        if kind == "result":
            _on_legacy_result(reply, time.monotonic() - sent_at, report, printer)
        elif kind == "error":
            report.errors.append(_error_text(reply))
            printer.status(f"chunk {index}: {_error_text(reply)}")
            if reply.get("fatal"):
                raise ClientError(f"session failed: {_error_text(reply)}")
        elif kind == "timeout":
            raise ClientError(f"session timed out: {reply.get('reason')}")
        else:
            raise ClientError(f"expected a result for chunk {index}, got {kind!r}")

    printer.end_turn()
    await ws.send(json.dumps({"type": "stop"}))
    try:
        while (await _receive(ws, CLOSE_TIMEOUT_S)).get("type") != "stopped":
            pass
    except (asyncio.TimeoutError, ConnectionClosed) as e:
        printer.status(f"no 'stopped' reply: {e!r}")
    return report


def _on_legacy_result(result: dict[str, Any], latency_s: float, report: SessionReport, printer: Printer) -> None:
    if result.get("buffered") or int(result.get("units", 1)) < 1:
        return  # too little audio for a unit yet (the first unit needs a little more than 1 s)
    report.units += int(result.get("units", 1))
    report.latencies_s.append(latency_s)
    if isinstance(result.get("wall_clock_ms"), (int, float)):
        report.server_wall_clock_ms.append(float(result["wall_clock_ms"]))
    if result.get("is_listen"):
        printer.end_turn()
        return
    report.speak_units += 1
    text = result.get("text") or ""
    report.text += text
    printer.text(text)
    if result.get("audio_data"):
        report.speech.append(decode_pcm(result["audio_data"]))
    if result.get("end_of_turn"):
        report.turns += 1
        printer.end_turn()


async def run_realtime(ws: ClientConnection, opts: ClientOptions, clip: MediaClip, printer: Printer) -> SessionReport:
    """One realtime v2 session: init, free-running input.append, output deltas, close after a quiet drain."""
    report = SessionReport()
    await _wait_for_queue(ws, printer, prefix="session.")
    await ws.send(json.dumps({"type": "session.init", "payload": {"system_prompt": opts.system_prompt}}))
    created = await _receive(ws)
    if created.get("type") != "session.created":
        raise ClientError(f"session.init failed: {_error_text(created)}")
    printer.status(f"session {created.get('session_id')} created")

    send_times: list[float] = []
    sender = asyncio.create_task(_send_realtime_input(ws, opts, clip, send_times))
    closed = False
    try:
        while not closed:
            # While input is still going out, wait as long as a reply may take; after it, until quiet.
            timeout_s = REPLY_TIMEOUT_S if not sender.done() else opts.drain_s
            try:
                event = await _receive(ws, timeout_s)
            except asyncio.TimeoutError:
                if not sender.done():
                    raise
                break
            closed = _on_realtime_event(event, send_times, report, printer)
        await sender
    finally:
        sender.cancel()
    printer.end_turn()
    if not closed:
        await ws.send(json.dumps({"type": "session.close", "reason": "user_stop"}))
        try:
            while not _on_realtime_event(await _receive(ws, CLOSE_TIMEOUT_S), send_times, report, printer):
                pass
        except (asyncio.TimeoutError, ConnectionClosed) as e:
            printer.status(f"no 'session.closed' reply: {e!r}")
    return report


async def _send_realtime_input(
    ws: ClientConnection, opts: ClientOptions, clip: MediaClip, send_times: list[float]
) -> None:
    pacer = _Pacer(opts.fast)
    for index, chunk in enumerate(clip.audio_chunks):
        await pacer.wait_turn(len(chunk))
        payload: dict[str, Any] = {"audio": encode_pcm(chunk)}
        frames = _chunk_frames(clip, index, opts.audio_only)
        if frames:
            payload["video_frames"] = frames
        send_times.append(time.monotonic())
        await ws.send(json.dumps({"type": "input.append", "input": payload}))


def _on_realtime_event(
    event: dict[str, Any], send_times: list[float], report: SessionReport, printer: Printer
) -> bool:
    """Handle one server event; returns True when the session is closed."""
    kind = event.get("type")
    if kind == "response.output.delta":
        delta_kind = event.get("kind")
        if delta_kind == "text":
            report.text += event.get("text", "")
            printer.text(event.get("text", ""))
        elif delta_kind == "audio":
            report.speech.append(decode_pcm(event.get("audio", "")))
            report.speak_units += 1
            index = event.get("chunk_index")
            if isinstance(index, int) and 0 <= index < len(send_times):
                report.latencies_s.append(time.monotonic() - send_times[index])
        elif delta_kind == "listen":
            report.turns += 1
            printer.end_turn()
    elif kind == "session.warning":
        printer.status(f"warning {event.get('code')}: {event.get('message')}")
    elif kind == "error":
        raise ClientError(f"session failed: {_error_text(event)}")
    elif kind == "session.closed":
        printer.status(f"session closed: {event.get('reason')}")
        return True
    return False


async def run_session(opts: ClientOptions, printer: Printer | None = None) -> SessionReport:
    """Decode the input, run one session with the chosen protocol, write the WAV; return the report."""
    printer = printer or Printer()
    clip = load_media(opts.input)
    audio_only = opts.audio_only or not clip.has_video
    session_id = opts.session_id or default_session_id(audio_only)
    base = websocket_base(opts.url)
    if opts.protocol == "legacy":
        url = f"{base}/ws/duplex/{quote(session_id, safe='')}"
        run, subprotocols = run_legacy, None
    else:
        url = f"{base}/v1/realtime?mode={'audio' if audio_only else 'video'}"
        run, subprotocols = run_realtime, ["map.realtime"]
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else None
    printer.status(f"{opts.protocol} session {session_id}: {len(clip.audio_chunks)} chunks "
                   f"({clip.duration_s:.1f} s, {len(clip.frames) if not audio_only else 0} frames) -> {url}")
    async with connect(url, additional_headers=headers, subprotocols=subprotocols,
                       max_size=MAX_MESSAGE_BYTES, open_timeout=30, close_timeout=CLOSE_TIMEOUT_S) as ws:
        report = await run(ws, replace(opts, audio_only=audio_only), clip, printer)
    if opts.out is not None:
        write_wav(opts.out, report.speech_samples())
        printer.status(f"wrote {report.speech_samples().size / OUTPUT_RATE:.2f} s of speech to {opts.out}")
    return report


def print_summary(report: SessionReport, out: TextIO = sys.stdout) -> None:
    """Unit counts and latency statistics, one line each."""
    stats = latency_summary(report.latencies_s)
    units = f"{report.units} units, " if report.units else ""  # realtime listening units send nothing
    out.write(f"{units}{report.speak_units} speaking, {report.turns} turns, {len(report.errors)} errors\n")
    if stats["count"]:
        out.write(f"latency (send -> result): count {stats['count']}, p50 {stats['p50_ms']:.0f} ms, "
                  f"p95 {stats['p95_ms']:.0f} ms, max {stats['max_ms']:.0f} ms\n")
    else:
        out.write("latency (send -> result): no units measured\n")
    if report.server_wall_clock_ms:
        wall = report.server_wall_clock_ms
        out.write(f"server wall_clock_ms: p50 {percentile(wall, 50):.0f}, p95 {percentile(wall, 95):.0f}, "
                  f"max {max(wall):.0f}\n")


def parse_args(argv: list[str] | None = None) -> ClientOptions:
    parser = argparse.ArgumentParser(prog="python -m clients", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://localhost:8006", help="gateway base URL (ws://, wss://, http://)")
    parser.add_argument("--protocol", choices=("legacy", "realtime"), default="legacy")
    parser.add_argument("--input", required=True, type=Path, help="MP4 (audio + video) or audio file")
    parser.add_argument("--audio-only", action="store_true", help="send no video frames (adx_ session)")
    parser.add_argument("--fast", action="store_true", help="send as fast as the server answers")
    parser.add_argument("--out", type=Path, help="write the spoken reply here (24 kHz mono WAV)")
    parser.add_argument("--session-id", help="legacy session id (default adx_/omni_ + time)")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer")
    parser.add_argument("--system-prompt", default=ClientOptions.system_prompt)
    parser.add_argument("--drain-s", type=float, default=ClientOptions.drain_s,
                        help="realtime: quiet time after the last input before closing")
    args = parser.parse_args(argv)
    return ClientOptions(**vars(args))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m clients`; returns the exit status."""
    opts = parse_args(argv)
    try:
        report = asyncio.run(run_session(opts))
    except (ClientError, MediaError, WebSocketException, asyncio.TimeoutError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(report)
    return 0
