"""The CLI client (clients/cli.py) over real sockets.

The protocol logic is tested against `ProtocolScriptServer`: a small real FastAPI/uvicorn server
written here that answers per PROTOCOL.md §1/§2 with a fixed script (unit n listens when n % 3 == 1,
speaks otherwise, and ends its turn when n % 3 == 0; speech of unit n is 1 s of the constant n / 100),
so every frame the client gets is known. It also serves the browser page, for tests/test_web_page.py.
The end-to-end test runs the client against the real gateway + worker (`running_stack()`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from PIL import Image

from clients.cli import ClientOptions, Printer, latency_summary, percentile, run_session
from server.web import web_router
from tests.gateway_helpers import running_stack

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# ------------------------------------------------------------------ protocol script server

def script_decision(unit: int) -> tuple[bool, bool]:
    """(is_listen, end_of_turn) of 1-based unit `unit` in the script."""
    return unit % 3 == 1, unit % 3 == 0


def script_speech(unit: int) -> str:
    """base64 float32 24 kHz: 1 s of the constant unit / 100, so order is visible in the output."""
    return base64.b64encode(np.full(24000, unit / 100.0, dtype="<f4").tobytes()).decode()


@dataclass
class ReceivedChunk:
    """What the script server saw in one audio chunk / input.append."""

    samples: int
    rms: float
    frame_sizes: list[tuple[int, int]]
    force_listen: bool
    received_at: float


@dataclass
class ScriptConnection:
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    messages: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[ReceivedChunk] = field(default_factory=list)


def _decode_chunk(audio_b64: str, frames_b64: list[str], force_listen: bool) -> ReceivedChunk:
    samples = np.frombuffer(base64.b64decode(audio_b64), dtype="<f4")
    sizes = [Image.open(io.BytesIO(base64.b64decode(f)), formats=["JPEG"]).size for f in frames_b64]
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0
    return ReceivedChunk(samples.size, rms, sizes, bool(force_listen), time.monotonic())


class ProtocolScriptServer:
    """Real uvicorn server on 127.0.0.1 answering the legacy and realtime protocols with the script."""

    def __init__(self, required_key: str | None = None, queue_position: int = 1) -> None:
        self.required_key = required_key
        self.queue_position = queue_position
        self.connections: list[ScriptConnection] = []
        self.app = FastAPI()
        self.app.include_router(web_router())
        self.app.get("/status")(lambda: {"total_workers": 1, "idle_workers": 1, "busy_workers": 0,
                                         "queue_length": 0, "max_queue_size": 100})
        self.app.websocket("/ws/duplex/{session_id}")(self._legacy)
        self.app.websocket("/v1/realtime")(self._realtime)

    def _open(self, websocket: WebSocket) -> ScriptConnection | None:
        conn = ScriptConnection(websocket.url.path, dict(websocket.headers), dict(websocket.query_params))
        self.connections.append(conn)
        presented = conn.headers.get("authorization", "").removeprefix("Bearer ") or conn.query.get("api_key")
        return None if self.required_key and presented != self.required_key else conn

    async def _legacy(self, websocket: WebSocket, session_id: str) -> None:
        conn = self._open(websocket)
        if conn is None:
            await websocket.close(code=1008)
            return
        await websocket.accept()
        await websocket.send_json({"type": "queued", "position": self.queue_position, "estimated_wait_s": 1.0,
                                   "ticket_id": "q_0123456789ab", "queue_length": self.queue_position})
        await websocket.send_json({"type": "queue_done"})
        prepared, chunk_count = False, 0
        try:
            while True:
                message = await websocket.receive_json()
                conn.messages.append(message)
                kind = message.get("type")
                if kind == "prepare":
                    prepared = True
                    await websocket.send_json({"type": "prepared", "prompt_length": 42, "session_id": session_id})
                elif kind == "audio_chunk" and not prepared:
                    await websocket.send_json({"type": "error", "error": "not prepared", "code": "not_prepared"})
                elif kind == "audio_chunk":
                    conn.chunks.append(_decode_chunk(message["audio_base64"], message.get("frame_base64_list") or [],
                                                     message.get("force_listen", False)))
                    await websocket.send_json(self._legacy_result(chunk_count, conn.chunks[-1].force_listen))
                    chunk_count += 1
                elif kind in ("pause", "resume"):
                    await websocket.send_json({"type": "paused" if kind == "pause" else "resumed"})
                elif kind == "stop":
                    await websocket.send_json({"type": "stopped"})
                    await websocket.close(code=1000)
                    return
        except WebSocketDisconnect:
            return

    @staticmethod
    def _legacy_result(chunk_index: int, force_listen: bool) -> dict[str, Any]:
        if chunk_index == 0:  # the first unit needs 16 560 samples: one 1 s chunk only buffers
            return {"type": "result", "buffered": True, "units": 0, "is_listen": True, "text": "", "audio_data": ""}
        is_listen, end_of_turn = script_decision(chunk_index)
        is_listen = is_listen or force_listen
        return {
            "type": "result", "is_listen": is_listen, "text": "" if is_listen else f"w{chunk_index} ",
            "audio_data": "" if is_listen else script_speech(chunk_index), "end_of_turn": end_of_turn and not is_listen,
            "current_time": chunk_index, "cost_all_ms": 40.0 + chunk_index, "wall_clock_ms": 50.0 + chunk_index,
            "kv_cache_length": 300 + 30 * chunk_index, "vision_slices": 1, "vision_tokens": 64,
            "server_send_ts": time.time(), "units": 1,
        }

    async def _realtime(self, websocket: WebSocket) -> None:
        conn = self._open(websocket)
        if conn is None:
            await websocket.close(code=1008)
            return
        offered = websocket.headers.get("sec-websocket-protocol", "")
        await websocket.accept(subprotocol="map.realtime" if "map.realtime" in offered else None)
        await websocket.send_json({"type": "session.queue_done"})
        chunk_count = 0
        try:
            while True:
                message = await websocket.receive_json()
                conn.messages.append(message)
                kind = message.get("type")
                if kind == "session.init":
                    await websocket.send_json({"type": "session.created", "session_id": "rt_script"})
                elif kind == "input.append":
                    data = message["input"]
                    conn.chunks.append(_decode_chunk(data["audio"], data.get("video_frames") or [],
                                                     data.get("force_listen", False)))
                    for event in self._realtime_events(chunk_count):
                        await websocket.send_json(event)
                    chunk_count += 1
                elif kind == "session.close":
                    await websocket.send_json({"type": "session.closed", "reason": message.get("reason")})
                    await websocket.close(code=1000)
                    return
        except WebSocketDisconnect:
            return

    @staticmethod
    def _realtime_events(chunk_index: int) -> list[dict[str, Any]]:
        if chunk_index == 0:
            return []
        is_listen, end_of_turn = script_decision(chunk_index)
        if is_listen:
            return []
        events = [
            {"type": "response.output.delta", "kind": "text", "text": f"w{chunk_index} ", "end_of_turn": end_of_turn},
            {"type": "response.output.delta", "kind": "audio", "audio": script_speech(chunk_index),
             "sample_rate": 24000, "format": "float32le", "chunk_index": chunk_index},
        ]
        if end_of_turn:
            events.append({"type": "response.output.delta", "kind": "listen", "text": ""})
        return events


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free port; yields the base http URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws_max_size=128 * 1024 * 1024))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# ------------------------------------------------------------------ fixtures and helpers

@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 s MP4 with a 440 Hz tone (16 kHz) over a test picture, made with the real ffmpeg."""
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=10:duration=4",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=4",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
        check=True, timeout=60,
    )
    return path


class _Capture(Printer):
    def __init__(self) -> None:
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        super().__init__(self.stdout, self.stderr)


def _read_wav(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path)) as wav:
        return wav.getframerate(), np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2") / 32767.0


# ------------------------------------------------------------------ tests against the script server

def test_cli_legacy_lock_step_against_protocol_script_server(clip_mp4: Path, tmp_path: Path) -> None:
    script = ProtocolScriptServer(required_key="k1", queue_position=2)
    out = tmp_path / "reply.wav"
    printer = _Capture()
    with serve(script.app) as base:
        opts = ClientOptions(url=base.replace("http", "ws"), input=clip_mp4, fast=True, out=out, api_key="k1")
        report = asyncio.run(run_session(opts, printer))

    conn = script.connections[0]
    assert conn.path.startswith("/ws/duplex/omni_")
    assert conn.headers["authorization"] == "Bearer k1"
    assert [m["type"] for m in conn.messages] == ["prepare"] + ["audio_chunk"] * 4 + ["stop"]
    assert [c.samples for c in conn.chunks] == [16000] * 4
    assert all(c.frame_sizes == [(320, 240)] for c in conn.chunks)
    assert all(0.06 < c.rms < 0.12 for c in conn.chunks), "the 440 Hz tone (amplitude 1/8) must arrive intact"
    # chunk 0 buffers; units 1..3 = listen, speak, speak + end of turn
    assert report.units == 3 and report.speak_units == 2 and report.turns == 1
    assert printer.stdout.getvalue() == "w2 w3 \n"
    assert "queued: position 2 of 2" in printer.stderr.getvalue()
    rate, speech = _read_wav(out)
    assert rate == 24000 and speech.size == 48000
    assert np.allclose(speech[:24000], 0.02, atol=1e-3) and np.allclose(speech[24000:], 0.03, atol=1e-3)
    assert latency_summary(report.latencies_s)["count"] == 3
    assert report.server_wall_clock_ms == [51.0, 52.0, 53.0]


def test_cli_legacy_audio_only_paces_in_real_time(clip_mp4: Path) -> None:
    script = ProtocolScriptServer()
    with serve(script.app) as base:
        opts = ClientOptions(url=base, input=clip_mp4, audio_only=True, session_id="my_id")
        asyncio.run(run_session(opts, _Capture()))

    conn = script.connections[0]
    assert conn.path == "/ws/duplex/my_id"
    assert all(c.frame_sizes == [] for c in conn.chunks)
    gaps = np.diff([c.received_at for c in conn.chunks])
    assert len(gaps) == 3 and np.all(gaps > 0.85) and np.all(gaps < 1.5), f"chunks not 1 s apart: {gaps}"


def test_cli_realtime_events_against_protocol_script_server(clip_mp4: Path, tmp_path: Path) -> None:
    script = ProtocolScriptServer()
    out = tmp_path / "reply.wav"
    printer = _Capture()
    with serve(script.app) as base:
        opts = ClientOptions(url=base, input=clip_mp4, protocol="realtime", fast=True, out=out,
                             api_key="sdk-key", drain_s=0.5)
        report = asyncio.run(run_session(opts, printer))

    conn = script.connections[0]
    assert conn.path == "/v1/realtime" and conn.query["mode"] == "video"
    assert conn.headers["authorization"] == "Bearer sdk-key"
    assert conn.headers["sec-websocket-protocol"] == "map.realtime"
    types = [m["type"] for m in conn.messages]
    assert types == ["session.init"] + ["input.append"] * 4 + ["session.close"]
    assert conn.messages[0]["payload"]["system_prompt"] == "You are a helpful assistant."
    assert all(c.frame_sizes == [(320, 240)] for c in conn.chunks)
    assert printer.stdout.getvalue() == "w2 w3 \n"
    assert report.speak_units == 2 and report.turns == 1
    assert latency_summary(report.latencies_s)["count"] == 2
    _, speech = _read_wav(out)
    assert speech.size == 48000 and np.allclose(speech[24000:], 0.03, atol=1e-3)


@pytest.mark.slow
def test_cli_entry_point_prints_statistics_and_fails_on_bad_key(clip_mp4: Path, tmp_path: Path) -> None:
    script = ProtocolScriptServer(required_key="right")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with serve(script.app) as base:
        args = [PYTHON, "-m", "clients", "--url", base, "--input", str(clip_mp4), "--fast", "--audio-only"]
        good = subprocess.run(args + ["--api-key", "right", "--out", str(tmp_path / "r.wav")],
                              capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env)
        bad = subprocess.run(args + ["--api-key", "wrong"], capture_output=True, text=True, timeout=60,
                             cwd=REPO_ROOT, env=env)
    assert good.returncode == 0, good.stderr
    lines = good.stdout.splitlines()
    assert lines[0] == "w2 w3 "
    assert lines[1] == "3 units, 2 speaking, 1 turns, 0 errors"
    assert lines[2].startswith("latency (send -> result): count 3, p50 ")
    assert lines[3] == "server wall_clock_ms: p50 52, p95 53, max 53"
    assert bad.returncode == 1 and "error:" in bad.stderr and "403" in bad.stderr


@pytest.mark.slow
def test_client_imports_no_torch() -> None:
    check = "import sys, clients.cli; assert 'torch' not in sys.modules, 'clients must not import torch'"
    run = subprocess.run([PYTHON, "-c", check], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 50) == 10.0 and percentile(values, 95) == 19.0 and percentile(values, 100) == 20.0
    assert latency_summary([0.1, 0.3, 0.2]) == {"count": 3, "p50_ms": 200.0, "p95_ms": 300.0, "max_ms": 300.0}


# ------------------------------------------------------------------ end to end

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_end_to_end_against_real_gateway_and_worker(clip_mp4: Path, tmp_path: Path) -> None:
    with running_stack(tmp_path) as base:
        legacy = asyncio.run(run_session(
            ClientOptions(url=base, input=clip_mp4, fast=True, out=tmp_path / "legacy.wav"), _Capture()))
        printer = _Capture()
        asyncio.run(run_session(ClientOptions(url=base, input=clip_mp4, protocol="realtime", fast=True,
                                              out=tmp_path / "realtime.wav", drain_s=5.0), printer))
    assert legacy.units >= 3 and len(legacy.latencies_s) == len(legacy.server_wall_clock_ms) >= 3
    assert not legacy.errors
    assert _read_wav(tmp_path / "legacy.wav")[1].size >= 24000 * legacy.speak_units  # >= 1 s per speaking unit
    assert "session closed: user_stop" in printer.stderr.getvalue()
    assert (tmp_path / "realtime.wav").is_file()
