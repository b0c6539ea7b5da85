"""Service limits, session recording and metrics over real WebSockets: a real CPU worker (tiny, no
compile, no warm-up) with short idle/session/pause limits behind a real gateway with a 1 MiB message
limit, a queue of one and recording on.

Where each limit is enforced: message size by each server's WebSocket layer (gateway and worker:
close 1009); queue length by the gateway (`queue_full`, 1013); idle time, session length and pause
length by the worker's session loop (`timeout` + 1000; v2 `session.closed` with the reason)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.request
import wave

import numpy as np
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_helpers import (
    REPO,
    b64_pcm,
    decode_pcm,
    expect_close,
    open_legacy,
    recv_json,
    send_json,
    start_gateway,
    start_worker,
    stop_legacy,
    wait_idle,
    wait_until,
)
from workers.media import load_media

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

IDLE_S, SESSION_S, PAUSE_S = 2, 15, 1  # SESSION_S leaves a loaded CI machine room for real units
MESSAGE_LIMIT = 1024 * 1024
RETENTION = 2
LISTEN_ONLY = {"force_listen_count": 1000}
SHORT_CHUNK = np.zeros(320, dtype=np.float32)  # 20 ms: a session of them stays below one unit


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    service = start_worker(
        tmp_path_factory.mktemp("limits_worker"),
        "--set", f"service.limits.idle_timeout_s={IDLE_S}", "--set", f"service.limits.max_session_s={SESSION_S}",
        "--set", f"duplex.pause_timeout_s={PAUSE_S}",
        "--set", "duplex.session_defaults.max_new_speak_tokens_per_chunk=4",
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    return tmp_path_factory.mktemp("recordings")


@pytest.fixture(scope="module")
def gateway(worker, recordings, tmp_path_factory):
    service = start_gateway(
        tmp_path_factory.mktemp("limits_gw"), [worker.http],
        f"service.limits.max_message_bytes={MESSAGE_LIMIT}", "service.limits.max_queue_size=1",
        "service.health_poll_s=0.2", "recording.enabled=true", f"recording.dir={recordings}",
        f"recording.retention_sessions={RETENTION}",
    )
    yield service
    service.stop()


@pytest.fixture
def idle(gateway):
    wait_idle(gateway)
    return gateway


async def _open_v2(gateway) -> websockets.ClientConnection:
    ws = await websockets.connect(f"{gateway.ws}/v1/realtime?mode=audio")
    assert (await recv_json(ws))["type"] == "session.queue_done"
    await send_json(ws, {"type": "session.init", "payload": {"config": LISTEN_ONLY}})
    assert (await recv_json(ws))["type"] == "session.created"
    return ws


async def test_idle_timeout_legacy_and_realtime(idle):
    ws = await open_legacy(idle, "limit_idle", config=LISTEN_ONLY)
    started = time.monotonic()
    frames = await expect_close(ws, 1000, timeout=IDLE_S + 5)
    assert frames == [{"type": "timeout", "code": "idle_timeout", "reason": f"Idle timeout ({IDLE_S}s)"}]
    assert IDLE_S - 0.5 <= time.monotonic() - started <= IDLE_S + 3

    wait_idle(idle)
    v2 = await _open_v2(idle)
    frames = await expect_close(v2, 1000, timeout=IDLE_S + 5)
    assert frames[-1]["type"] == "session.closed" and frames[-1]["reason"] == "idle_timeout"


async def _send_every_half_second(ws, message: dict) -> None:
    """Keep the session from being idle until the server closes it."""
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            await send_json(ws, message)
            await asyncio.sleep(0.5)


async def _frames_until_close_while_sending(ws, message: dict) -> list[dict]:
    sender = asyncio.create_task(_send_every_half_second(ws, message))
    try:
        frames = await expect_close(ws, 1000, timeout=SESSION_S + 10)
    finally:
        sender.cancel()
    return frames


async def test_max_session_length_legacy(idle):
    started = time.monotonic()  # the session's clock starts when the worker socket opens
    ws = await open_legacy(idle, "limit_duration", config=LISTEN_ONLY)
    chunk = {"type": "audio_chunk", "audio_base64": b64_pcm(SHORT_CHUNK)}
    frames = await _frames_until_close_while_sending(ws, chunk)
    took = time.monotonic() - started
    assert frames[-1] == {"type": "timeout", "code": "max_duration",
                          "reason": f"Session reached its {SESSION_S}s limit"}
    assert all(f["type"] == "result" and f.get("buffered") for f in frames[:-1]) and len(frames) > 2 * IDLE_S
    assert SESSION_S <= took <= SESSION_S + 3


async def test_max_session_length_realtime(idle):
    started = time.monotonic()
    ws = await _open_v2(idle)
    append = {"type": "input.append", "input": {"audio": b64_pcm(SHORT_CHUNK)}}
    frames = await _frames_until_close_while_sending(ws, append)
    took = time.monotonic() - started
    assert frames == [frames[-1]] and frames[-1]["type"] == "session.closed"  # buffered input: no events
    assert frames[-1]["reason"] == "max_duration" and SESSION_S <= took <= SESSION_S + 3


async def test_pause_timeout_from_config(idle):
    ws = await open_legacy(idle, "limit_pause", config=LISTEN_ONLY)
    await send_json(ws, {"type": "pause"})
    assert await recv_json(ws) == {"type": "paused", "timeout": PAUSE_S}
    frames = await expect_close(ws, 1000, timeout=PAUSE_S + 5)
    assert frames == [{"type": "timeout", "code": "pause_timeout", "reason": f"Pause timeout ({PAUSE_S}s)"}]


async def test_message_over_the_limit_closes_1009(idle):
    ws = await open_legacy(idle, "limit_size", config=LISTEN_ONLY)
    await ws.send(json.dumps({"type": "audio_chunk", "audio_base64": "A" * MESSAGE_LIMIT}))
    await expect_close(ws, 1009)
    wait_idle(idle)
    v2 = await _open_v2(idle)  # row 14 on realtime v2: the same close, the worker cleaned up
    await v2.send(json.dumps({"type": "input.append", "input": {"audio": "A" * MESSAGE_LIMIT}}))
    await expect_close(v2, 1009)
    wait_idle(idle)
    ws = await open_legacy(idle, "limit_size_after", config=LISTEN_ONLY)
    await stop_legacy(ws)


async def test_queue_full(idle):
    first = await open_legacy(idle, "limit_q1", config=LISTEN_ONLY)
    second = await websockets.connect(f"{idle.ws}/ws/duplex/limit_q2")
    queued = await recv_json(second)
    assert queued["type"] == "queued" and queued["position"] == 1
    third = await websockets.connect(f"{idle.ws}/ws/duplex/limit_q3")
    frames = await expect_close(third, 1013)
    assert frames == [{"type": "error", "error": "Queue full (1 requests)", "code": "queue_full",
                       "message": "Queue full (1 requests)", "fatal": True}]
    realtime = await websockets.connect(f"{idle.ws}/v1/realtime?mode=audio")  # row 28 on realtime v2
    frames = await expect_close(realtime, 1013)
    assert frames[0] == {"type": "error", "error": {"code": "queue_full", "message": "Queue full (1 requests)"}}
    await send_json(second, {"type": "stop"})
    assert (await expect_close(second, 1000))[-1]["type"] == "stopped"
    await stop_legacy(first)


async def test_recording_of_an_omni_session_and_retention(idle, recordings):
    clip = load_media(REPO / "assets" / "warmup.mp4", max_seconds=3)
    # more sessions than the retention limit: only the newest RETENTION directories stay
    await stop_legacy(await open_legacy(idle, "rec_short", config=LISTEN_ONLY))
    wait_idle(idle)
    ws = await open_legacy(idle, "rec_full", config={"force_listen_count": 0})
    sent_audio, sent_frames, results = [], [], []
    for index in range(2):
        audio = np.asarray(clip.audio_chunks[index], dtype=np.float32)
        audio = np.concatenate([audio, np.zeros(560, dtype=np.float32)]) if index == 0 else audio
        sent_audio.append(audio)
        sent_frames.append(clip.frames[index])
        await send_json(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(audio),
                             "frame_base64_list": [base64.b64encode(clip.frames[index]).decode("ascii")]})
        results.append(await recv_json(ws, timeout=120))
    await stop_legacy(ws)

    def finished() -> list:
        sessions = sorted(p for p in recordings.iterdir() if p.is_dir())
        newest = sessions[-1] / "session.json" if sessions else None
        return sessions if newest and "end_reason" in json.loads(newest.read_text()) else []
    wait_until(finished, timeout_s=10)
    sessions = finished()
    assert len(sessions) == RETENTION and sessions[-2].name.endswith("_rec_short")
    folder = sessions[-1]
    meta = json.loads((folder / "session.json").read_text())
    assert meta["session_id"] == "rec_full" and meta["kind"] == "omni_duplex" and meta["protocol"] == "legacy"
    assert meta["end_reason"] == "stopped" and meta["chunks"] == 2 and meta["results"] == 2

    input_pcm = _read_wav(folder / "input.wav", 16000)
    expected_in = np.concatenate(sent_audio)
    assert len(input_pcm) == len(expected_in)
    assert np.abs(input_pcm - np.clip(expected_in, -1, 1)).max() < 1e-3
    assert [p.read_bytes() for p in sorted((folder / "frames").iterdir())] == sent_frames

    output_pcm = _read_wav(folder / "output.wav", 24000)
    expected_out = np.concatenate([decode_pcm(r["audio_data"]) for r in results])
    assert len(output_pcm) == len(expected_out) > 0
    assert np.abs(output_pcm - np.clip(expected_out, -1, 1)).max() < 1e-3

    timeline = [json.loads(line) for line in (folder / "timeline.jsonl").read_text().splitlines()]
    assert [t["result_index"] for t in timeline] == [0, 1]
    for line, result in zip(timeline, results):
        assert "audio_data" not in line and line["t_s"] >= 0
        assert {k: line[k] for k in ("is_listen", "text", "n_tokens", "wall_clock_ms")} == {
            k: result[k] for k in ("is_listen", "text", "n_tokens", "wall_clock_ms")}


async def test_metrics_count_sessions_units_and_errors(idle):
    with urllib.request.urlopen(f"{idle.http}/metrics", timeout=5) as reply:
        families = {f.name: f.samples for f in text_string_to_metric_families(reply.read().decode())}

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(s.value for s in families[family]
                   if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("omni_gateway_sessions", "omni_gateway_sessions_total", protocol="legacy") >= 6
    assert value("omni_gateway_sessions", "omni_gateway_sessions_total", protocol="realtime") >= 2
    assert value("omni_gateway_sessions_active", "omni_gateway_sessions_active") == 0
    assert value("omni_gateway_sessions_queued", "omni_gateway_sessions_queued") == 0
    assert value("omni_gateway_queue_wait_seconds", "omni_gateway_queue_wait_seconds_count") >= 6
    assert value("omni_gateway_units", "omni_gateway_units_total") >= 2
    assert value("omni_gateway_unit_wall_clock_seconds", "omni_gateway_unit_wall_clock_seconds_count") >= 2
    assert value("omni_gateway_errors", "omni_gateway_errors_total", code="queue_full") == 2  # legacy + v2
    assert value("omni_gateway_worker_state", "omni_gateway_worker_state", state="idle") == 1


def _read_wav(path, sample_rate: int) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        assert wav.getframerate() == sample_rate and wav.getnchannels() == 1 and wav.getsampwidth() == 2
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32767.0
