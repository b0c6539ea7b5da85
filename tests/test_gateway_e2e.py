"""The gateway end to end: a real CPU worker (tiny preset) and a real gateway as subprocesses,
spoken to over real WebSockets — legacy duplex clients, the openbmb-realtime SDK, the queue, and the
bad inputs of PROTOCOL.md §4 through the gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal

import numpy as np
import pytest
import websockets
from openbmb_realtime import (
    AudioDelta,
    RealtimeClient,
    RealtimeConfig,
    SessionClosed,
    TextDelta,
    TurnCompleted,
)

from tests.gateway_helpers import (
    MAX_MESSAGE_BYTES,
    REPO,
    b64_pcm,
    connect,
    decode_pcm,
    expect_close,
    http_json,
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# Worker defaults that keep CPU units short: the model may speak from the 2nd unit, 4 tokens per unit.
WORKER_DEFAULTS = ("--set", "duplex.session_defaults.force_listen_count=1",
                   "--set", "duplex.session_defaults.max_new_speak_tokens_per_chunk=4")
GATEWAY_SETTINGS = ("service.limits.max_queue_size=2", "service.health_poll_s=0.2",
                    "service.worker_dead_after_s=3")
LISTEN_ONLY = {"force_listen_count": 1000}  # legacy sessions that must stay cheap
RESULT_FIELDS = {
    "is_listen", "text", "audio_data", "end_of_turn", "current_time", "cost_llm_ms", "cost_tts_prep_ms",
    "cost_tts_ms", "cost_token2wav_ms", "cost_all_ms", "n_tokens", "n_tts_tokens", "server_send_ts",
    "wall_clock_ms", "kv_cache_length", "vision_slices", "vision_tokens",
}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    service = start_worker(tmp_path_factory.mktemp("gw_worker"), *WORKER_DEFAULTS)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def gateway(worker, tmp_path_factory):
    service = start_gateway(tmp_path_factory.mktemp("gw"), [worker.http], *GATEWAY_SETTINGS)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def clip():
    return load_media(REPO / "assets" / "warmup.mp4")


@pytest.fixture
def idle(gateway):
    """Each test starts with the worker idle again (the previous session's cleanup confirmed)."""
    wait_idle(gateway)
    return gateway


def jpeg_b64(clip, index: int) -> str:
    return base64.b64encode(clip.frames[index]).decode("ascii")


def check_result(result: dict) -> None:
    assert result["type"] == "result", result
    if result.get("buffered"):
        assert result["units"] == 0 and result["audio_data"] == ""
        return
    assert RESULT_FIELDS <= result.keys(), RESULT_FIELDS - result.keys()
    audio = decode_pcm(result["audio_data"])  # float32 LE, 24 kHz: >= 1 s except a turn's last unit
    assert np.isfinite(audio).all()
    if result["is_listen"]:
        assert len(audio) == 24000 and not audio.any()
    else:
        assert len(audio) > 0 and result["n_tts_tokens"] > 0


# ---- legacy protocol ---------------------------------------------------------------------------

async def test_legacy_omni_and_audio_only_sessions_stream_the_mp4(idle, clip):
    chunks = clip.audio_chunks[:3]
    # omni: free-running like the browser (audio + one frame per chunk), replies read afterwards
    ws = await open_legacy(idle, "e2e_omni_mp4", system_prompt="Describe what you see.",
                           config={"force_listen_count": 2})  # listen, listen, then the model speaks
    for i, chunk in enumerate(chunks):
        await send_json(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(chunk),
                             "frame_base64_list": [jpeg_b64(clip, i)]})
    omni = [await recv_json(ws) for _ in chunks]
    await stop_legacy(ws)
    for result in omni:
        check_result(result)
    assert [r["current_time"] for r in omni if not r.get("buffered")] == list(range(1, len(chunks) + 1))
    assert all(r["vision_slices"] >= 1 and r["vision_tokens"] >= 64 for r in omni)
    assert any(not r["is_listen"] for r in omni), "the model should speak once force_listen_count has passed"

    # audio-only (adx_ prefix): lock-step, one result per chunk
    wait_idle(idle)
    ws = await open_legacy(idle, "adx_e2e_mp4", config=LISTEN_ONLY)
    audio_only = []
    for chunk in chunks[:3]:
        await send_json(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(chunk)})
        audio_only.append(await recv_json(ws))
    await stop_legacy(ws)
    for result in audio_only:
        check_result(result)
        assert result["vision_slices"] == 0


async def test_legacy_session_id_sanitised_diagnostics_consumed_interrupt(idle):
    ws = await connect(f"{idle.ws}/ws/duplex/e2e%20..%21" + "x" * 300)
    assert (await recv_json(ws))["type"] == "queue_done"
    running = http_json(f"{idle.http}/status")["running_sessions"]
    assert len(running) == 1 and running[0]["session_id"] == "e2e" + "x" * 125
    assert running[0]["kind"] == "omni_duplex" and running[0]["age_s"] >= 0
    await send_json(ws, {"type": "client_diagnostic", "payload": {"fps": 30}})
    await send_json(ws, {"type": "prepare", "config": {**LISTEN_ONLY, "max_kv_tokens": 8000, "brand_new_key": 1}})
    assert (await recv_json(ws))["type"] == "prepared"  # nothing was sent for the diagnostic
    await send_json(ws, {"type": "interrupt"})
    assert (await recv_json(ws))["type"] == "interrupted"
    await stop_legacy(ws)


# ---- realtime v2 through the SDK ---------------------------------------------------------------

async def _sdk_session(gateway, clip, mode: str) -> dict:
    client = RealtimeClient(api_key="test-key", base_url=gateway.http)
    connector = client.video if mode == "video" else client.audio
    session = await connector.connect(model="minicpm-o-4.5-realtime", system_prompt="Talk with me.",
                                      config=RealtimeConfig(tts_enabled=True, length_penalty=1.1))
    assert session.id.startswith("rt_")
    events: list = []
    turn_done = asyncio.Event()

    async def read() -> None:
        async for event in session:
            events.append(event)
            if isinstance(event, TurnCompleted):
                turn_done.set()

    reader = asyncio.create_task(read())
    for i in range(2):  # the 1st unit listens (force_listen_count=1), the 2nd speaks
        pcm = np.asarray(clip.audio_chunks[i], dtype="<f4").tobytes()
        if mode == "video":
            await session.send_audio_video(pcm, clip.frames[i])
        else:
            await session.send_audio(pcm)
    await asyncio.wait_for(_first(events, AudioDelta), 120)
    session.interrupt()  # barge-in: the next chunk forces listening, which closes the turn
    await session.send_audio(np.asarray(clip.audio_chunks[2], dtype="<f4").tobytes())
    await asyncio.wait_for(turn_done.wait(), 120)
    usage_at_turn = session.usage
    await session.close()
    await asyncio.wait_for(reader, 30)
    return {"events": events, "session": session, "usage_at_turn": usage_at_turn}


async def _first(events: list, kind: type) -> None:
    while not any(isinstance(e, kind) for e in events):
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("mode", ["audio", "video"])
async def test_realtime_sdk_session(idle, clip, mode):
    outcome = await _sdk_session(idle, clip, mode)
    events, session = outcome["events"], outcome["session"]
    kinds = [type(e).__name__ for e in events]
    assert "TextDelta" in kinds and "AudioDelta" in kinds and "TurnCompleted" in kinds, kinds
    assert kinds.index("TextDelta") < kinds.index("AudioDelta")  # text of a unit before its audio
    assert kinds.count("TurnCompleted") >= 1
    audio = b"".join(e.audio for e in events if isinstance(e, AudioDelta))
    assert len(audio) % 4 == 0 and np.isfinite(np.frombuffer(audio, "<f4")).all()
    assert any(isinstance(e, TextDelta) and e.text for e in events)
    closed = [e for e in events if isinstance(e, SessionClosed)]
    assert closed and closed[-1].reason == "user_stop"
    assert session.state.value == "closed"
    usage = session.usage
    assert usage is not None and usage.completion_tokens > 0 and usage.audio_output_tokens > 0
    assert usage.prompt_tokens >= usage.audio_input_tokens > 0
    if mode == "video":
        assert usage.vision_input_tokens >= 64


async def test_realtime_raw_frames_listen_usage_and_no_response_done(idle, clip):
    """Frame-level v2 details the SDK hides: subprotocol, created fields, listen text, extras, usage."""
    ws = await websockets.connect(f"{idle.ws}/v1/realtime?mode=audio&model=x&extra=1", subprotocols=["map.realtime"],
                                  max_size=MAX_MESSAGE_BYTES)
    assert ws.subprotocol == "map.realtime"
    assert (await recv_json(ws))["type"] == "session.queue_done"
    await send_json(ws, {"type": "session.init", "payload": {"config": {"tts_enabled": True}}})
    created = await recv_json(ws)
    assert created["type"] == "session.created" and created["session_id"].startswith("rt_")
    assert created["prompt_tokens"] > 0
    for i in range(2):
        await send_json(ws, {"type": "input.append", "input": {"audio": b64_pcm(clip.audio_chunks[i])}})
    await send_json(ws, {"type": "input.append", "input": {"audio": b64_pcm(clip.audio_chunks[2]),
                                                           "force_listen": True}})
    frames = []
    while not any(f.get("kind") == "listen" for f in frames):
        frames.append(await recv_json(ws, timeout=120))
    await send_json(ws, {"type": "session.close", "reason": "user_stop"})
    frames += await expect_close(ws, 1000)
    assert not any(f["type"] == "response.done" for f in frames)
    audio = [f for f in frames if f.get("kind") == "audio"]
    assert audio and all(f["sample_rate"] == 24000 and f["format"] == "float32le" for f in audio)
    assert all({"end_of_turn", "response_id", "chunk_index"} <= f.keys() for f in audio)
    listen = [f for f in frames if f.get("kind") == "listen"]
    assert len(listen) == 1 and listen[0]["text"] == ""
    assert frames.index(listen[0]) > frames.index(audio[-1])  # listen only after the turn's audio
    closed = frames[-1]
    assert closed["type"] == "session.closed" and closed["reason"] == "user_stop"
    assert closed["usage"]["total_tokens"] >= listen[0]["usage"]["total_tokens"] > 0


# ---- queue -------------------------------------------------------------------------------------

async def test_queue_positions_updates_order_and_leaving(idle):
    first = await open_legacy(idle, "q_first", config=LISTEN_ONLY)
    second = await connect(f"{idle.ws}/ws/duplex/q_second")
    await send_json(second, {"type": "prepare", "config": LISTEN_ONLY})  # early prepare: held, not dropped
    queued_second = await recv_json(second)
    third = await connect(f"{idle.ws}/ws/duplex/adx_q_third")
    queued_third = await recv_json(third)
    assert queued_second["type"] == "queued" and queued_second["position"] == 1
    assert queued_third["type"] == "queued" and queued_third["position"] == 2
    assert queued_third["ticket_id"].startswith("q_") and queued_third["queue_length"] == 2
    assert queued_third["estimated_wait_s"] > queued_second["estimated_wait_s"] > 0

    # the queue holds 2: a fourth client is refused
    refused = await connect(f"{idle.ws}/ws/duplex/q_refused")
    frames = await expect_close(refused, 1013)
    assert frames[0]["type"] == "error" and frames[0]["code"] == "queue_full"
    assert frames[0]["error"] == "Queue full (2 requests)"

    update = await recv_json(second, timeout=5)
    assert update["type"] == "queue_update" and update["position"] == 1
    assert (await recv_json(third, timeout=5))["position"] == 2

    await stop_legacy(first)
    assert (await recv_json(second, timeout=20))["type"] == "queue_done"
    assert (await recv_json(second))["type"] == "prepared"  # the held prepare, answered after queue_done
    while (update := await recv_json(third, timeout=5))["position"] != 1:
        assert update["type"] == "queue_update"

    # a client that leaves the queue is removed; stop while queued answers stopped without queue_done
    leaving = await connect(f"{idle.ws}/ws/duplex/q_leaving")
    assert (await recv_json(leaving))["position"] == 2
    await leaving.close()
    wait_until(lambda: http_json(f"{idle.http}/api/queue")["queue_length"] == 1)
    stopping = await connect(f"{idle.ws}/ws/duplex/q_stopping")
    assert (await recv_json(stopping))["type"] == "queued"
    await send_json(stopping, {"type": "stop"})
    assert await expect_close(stopping, 1000) == [{"type": "stopped"}]
    overflowing = await connect(f"{idle.ws}/ws/duplex/q_overflow")
    assert (await recv_json(overflowing))["type"] == "queued"
    for _ in range(65):
        await send_json(overflowing, {"type": "resume"})
    frames = await expect_close(overflowing, 1013)
    assert frames[-1]["code"] == "queue_hold_overflow"
    tickets = http_json(f"{idle.http}/api/queue")["tickets"]
    assert [t["session_id"] for t in tickets] == ["adx_q_third"] and tickets[0]["kind"] == "audio_duplex"

    await stop_legacy(second)
    assert (await recv_json(third, timeout=20))["type"] == "queue_done"
    await send_json(third, {"type": "prepare", "config": LISTEN_ONLY})
    assert (await recv_json(third))["type"] == "prepared"
    await stop_legacy(third)


# ---- bad inputs (PROTOCOL.md §4), legacy ---------------------------------------------------------

def _error(frame: dict, code: str) -> dict:
    assert frame["type"] == "error" and frame["code"] == code, frame
    assert frame["error"] and frame["message"] and frame["fatal"] is False
    return frame


async def test_legacy_bad_inputs_keep_the_session(idle, clip):
    second = np.asarray(clip.audio_chunks[0], dtype="<f4")
    ws = await connect(f"{idle.ws}/ws/duplex/e2e_bad")
    assert (await recv_json(ws))["type"] == "queue_done"

    async def ask(frame) -> dict:
        await (ws.send(frame) if isinstance(frame, (str, bytes)) else send_json(ws, frame))
        return await recv_json(ws)

    _error(await ask({"type": "audio_chunk", "audio_base64": b64_pcm(second)}), "not_prepared")  # row 15
    _error(await ask({"type": "prepare", "ref_audio_base64": "!!!"}), "bad_ref_audio")  # row 17
    assert "temperature" in _error(await ask({"type": "prepare", "config": {"temperature": 9}}),
                                   "invalid_config")["error"]  # row 18
    _error(await ask({"type": "prepare", "ref_audio_path": "/etc/passwd"}), "ref_audio_path_forbidden")  # row 19
    _error(await ask({"type": "prepare", "ref_audio_base64": b64_pcm(np.zeros(1))}), "bad_ref_audio")  # too short
    _error(await ask({"type": "prepare", "config": {"seed": 2**70}}), "invalid_config")
    _error(await ask({"type": "prepare", "config": {"temperature": "0.5"}}), "invalid_config")  # a wrong type
    assert "system_prompt" in _error(await ask({"type": "prepare", "system_prompt": "hello world " * 20000}),
                                     "invalid_config")["error"]  # more than the session's KV holds
    assert (await ask({"type": "prepare", "config": LISTEN_ONLY}))["type"] == "prepared"  # retry works
    _error(await ask("{not json"), "bad_json")  # row 1
    _error(await ask('{"type": "resume", "x": ' + "1" * 5000 + "}"), "bad_json")  # over Python's digit limit
    _error(await ask('{"type": "resume", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"), "bad_json")  # too deep
    for frame in ("[1, 2]", "{}", '{"type": 5}'):
        _error(await ask(frame), "bad_message")  # row 2
    _error(await ask(b"\x00\x01"), "binary_frame")  # row 3
    assert _error(await ask({"type": "video_frame"}), "unknown_type")["error"] == "Unknown message type: video_frame"
    assert _error(await ask({"type": "audio_chunk"}), "missing_audio")["error"] == "Missing audio_base64"  # row 5
    _error(await ask({"type": "audio_chunk", "audio_base64": "@@@@"}), "bad_base64")  # row 6
    _error(await ask({"type": "audio_chunk", "audio_base64": base64.b64encode(b"abcde").decode()}),
           "bad_pcm_length")  # row 7
    _error(await ask({"type": "audio_chunk", "audio_base64": b64_pcm([0.0, np.nan, np.inf])}),
           "non_finite_audio")  # row 8
    _error(await ask({"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(16000 * 11))}),
           "chunk_too_long")  # row 11
    short = await ask({"type": "audio_chunk", "audio_base64": b64_pcm(second[:8000])})  # row 9
    assert short["type"] == "result" and short["buffered"] is True and short["units"] == 0
    assert short["is_listen"] is True and short["audio_data"] == ""
    long = await ask({"type": "audio_chunk", "audio_base64": b64_pcm(np.tile(second, 3))})  # row 10
    assert long["type"] == "result" and long["units"] == 3  # 8000 + 48000 samples: 3 units, 8000 left
    frames = [jpeg_b64(clip, 0), base64.b64encode(b"not a jpeg").decode()]
    bad_frame = await ask({"type": "audio_chunk", "audio_base64": b64_pcm(second), "frame_base64_list": frames,
                           "force_listen": "yes", "max_slice_nums": 99})  # rows 12, 20, 21
    assert bad_frame["type"] == "result" and bad_frame["units"] == 1
    warning_codes = {w["code"] for w in bad_frame["warnings"]}
    assert {"bad_frame", "max_slice_nums_clamped"} <= warning_codes
    many = await ask({"type": "audio_chunk", "audio_base64": b64_pcm(second),
                      "frame_base64_list": [jpeg_b64(clip, 1)] * 5})  # row 13
    assert many["type"] == "result" and "too_many_frames" in {w["code"] for w in many["warnings"]}
    _error(await ask({"type": "prepare"}), "already_prepared")  # row 16
    assert (await ask({"type": "pause", "timeout": 10**400}))["timeout"] == 300  # beyond a float: clamped
    assert (await ask({"type": "pause", "timeout": 30}))["type"] == "paused"  # row 23
    paused = _error(await ask({"type": "audio_chunk", "audio_base64": b64_pcm(second)}), "paused")  # row 22
    assert paused["error"] == "Worker is paused"
    _error(await ask({"type": "prepare"}), "already_prepared")  # row 24
    assert (await ask({"type": "resume"}))["type"] == "resumed"
    assert (await ask({"type": "resume"}))["type"] == "resumed"  # row 23
    assert (await ask({"type": "audio_chunk", "audio_base64": b64_pcm(second)}))["type"] == "result"
    # pause expiry: timeout (clamped to >= 1 s) then close 1000
    assert (await ask({"type": "pause", "timeout": 0.2}))["timeout"] == 1
    frames = await expect_close(ws, 1000)
    assert frames[-1]["type"] == "timeout" and frames[-1]["code"] == "pause_timeout"
    assert frames[-1]["reason"] == "Pause timeout (1s)"

    # row 25: nothing after stop; the worker survived all of it and serves the next session
    wait_idle(idle)
    ws = await open_legacy(idle, "e2e_after_bad", config=LISTEN_ONLY)
    await send_json(ws, {"type": "stop"})
    await send_json(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(second)})
    assert await expect_close(ws, 1000) == [{"type": "stopped"}]


async def test_message_over_128_mib_closes_1009_and_worker_recovers(idle):
    ws = await open_legacy(idle, "e2e_huge", config=LISTEN_ONLY)
    with pytest.raises(websockets.ConnectionClosed):
        await ws.send("x" * (MAX_MESSAGE_BYTES + 1))
        await recv_json(ws)
    assert ws.close_code == 1009
    wait_idle(idle)
    ws = await open_legacy(idle, "e2e_after_huge", config=LISTEN_ONLY)
    await stop_legacy(ws)


# ---- bad inputs, realtime v2 ---------------------------------------------------------------------

async def _open_v2(gateway, mode: str = "audio", init: dict | None = None):
    ws = await websockets.connect(f"{gateway.ws}/v1/realtime?mode={mode}", max_size=MAX_MESSAGE_BYTES)
    assert (await recv_json(ws))["type"] == "session.queue_done"
    await send_json(ws, {"type": "session.init", "payload": init or {}})
    return ws


def _warning(frame: dict, code: str) -> None:
    assert frame["type"] == "session.warning" and frame["code"] == code and frame["message"], frame


async def test_realtime_appends_before_session_created_are_bounded(idle, clip):
    """PROTOCOL.md §2.2: appends before session.created are held as in §1.9 rule 2 (64 messages here)."""
    ws = await websockets.connect(f"{idle.ws}/v1/realtime?mode=audio", max_size=MAX_MESSAGE_BYTES)
    assert (await recv_json(ws))["type"] == "session.queue_done"
    append = {"type": "input.append", "input": {"audio": b64_pcm(np.zeros(1600, dtype=np.float32))}}
    for _ in range(65):  # no session.init: nothing is ever created
        await send_json(ws, append)
    frames = await expect_close(ws, 1013)
    assert frames[0]["type"] == "error" and frames[0]["error"]["code"] == "queue_hold_overflow", frames
    wait_idle(idle)


async def test_realtime_bad_inputs_become_warnings(idle, clip):
    ws = await websockets.connect(f"{idle.ws}/v1/realtime?mode=audio", max_size=MAX_MESSAGE_BYTES)
    assert (await recv_json(ws))["type"] == "session.queue_done"
    second = np.asarray(clip.audio_chunks[0], dtype="<f4")
    # input.append before session.created is held, then run
    await send_json(ws, {"type": "input.append", "input": {"audio": b64_pcm(second[:4000]),
                                                           "video_frames": [jpeg_b64(clip, 0)]}})
    await send_json(ws, {"type": "session.init", "payload": {}})
    _warning(await recv_json(ws), "frames_ignored")  # audio mode: frames ignored, said once
    assert (await recv_json(ws))["type"] == "session.created"

    async def ask(frame) -> dict:
        await (ws.send(frame) if isinstance(frame, (str, bytes)) else send_json(ws, frame))
        return await recv_json(ws)

    _warning(await ask("{oops"), "bad_json")
    _warning(await ask('{"type": "input.append", "x": ' + "1" * 5000 + "}"), "bad_json")
    _warning(await ask("[]"), "bad_message")
    _warning(await ask(b"\x01"), "binary_frame")
    _warning(await ask({"type": "input_audio_buffer.commit"}), "unknown_type")
    _warning(await ask({"type": "session.init", "payload": {}}), "already_prepared")
    _warning(await ask({"type": "input.append", "input": {}}), "missing_audio")
    _warning(await ask({"type": "input.append", "input": {"audio": "%%%"}}), "bad_base64")
    _warning(await ask({"type": "input.append", "input": {"audio": base64.b64encode(b"abc").decode()}}),
             "bad_pcm_length")
    _warning(await ask({"type": "input.append", "input": {"audio": b64_pcm([np.inf])}}), "non_finite_audio")
    _warning(await ask({"type": "input.append", "audio_base64": b64_pcm(np.zeros(16000 * 11))}), "chunk_too_long")
    await send_json(ws, {"type": "input.append", "input": {"audio": b64_pcm(second[:4000]),
                                                           "video_frames": [jpeg_b64(clip, 1)]}})
    await send_json(ws, {"type": "session.close", "reason": "user_stop"})
    frames = await expect_close(ws, 1000)
    assert [f["type"] for f in frames] == ["session.closed"]  # short chunk: buffered, no frame
    assert frames[0]["reason"] == "user_stop" and frames[0]["usage"]["input_tokens"] > 0


@pytest.mark.parametrize(("init", "code"), [
    ({"voice": {"ref_audio_base64": "!!notbase64"}}, "bad_ref_audio"),
    ({"config": {"temperature": "hot"}}, "invalid_config"),
])
async def test_realtime_bad_init_is_fatal(idle, init, code):
    ws = await _open_v2(idle, init=init)
    frames = await expect_close(ws, 1000)
    assert frames[0]["type"] == "error" and frames[0]["error"]["code"] == code and frames[0]["error"]["message"]
    assert frames[1] == {"type": "session.closed", "reason": "error"}


async def test_realtime_messages_after_close_get_no_answer(idle):  # row 25
    ws = await _open_v2(idle, init={"config": LISTEN_ONLY})
    assert (await recv_json(ws))["type"] == "session.created"
    await send_json(ws, {"type": "session.close"})
    await send_json(ws, {"type": "input.append", "input": {"audio": b64_pcm(np.zeros(16000))}})
    await send_json(ws, {"type": "session.init", "payload": {}})
    frames = await expect_close(ws, 1000)
    assert [frame["type"] for frame in frames] == ["session.closed"] and frames[0]["reason"] == "user_stop"


async def test_legacy_interrupt_while_paused_leaves_the_pause(idle):  # row 24
    ws = await open_legacy(idle, "e2e_paused_interrupt", config=LISTEN_ONLY)
    await send_json(ws, {"type": "pause"})
    assert (await recv_json(ws))["type"] == "paused"
    await send_json(ws, {"type": "interrupt"})
    assert await recv_json(ws) == {"type": "interrupted"}
    await send_json(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(16000))})
    assert (await recv_json(ws))["code"] == "paused"  # still paused: the chunk is discarded
    await send_json(ws, {"type": "resume"})
    assert await recv_json(ws) == {"type": "resumed"}
    await send_json(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(16000))})
    result = await recv_json(ws)
    assert result["type"] == "result" and result["current_time"] == 1 and result["is_listen"] is True
    await stop_legacy(ws)


async def test_realtime_invalid_mode_and_video_bad_frame(idle, clip):
    ws = await websockets.connect(f"{idle.ws}/v1/realtime?mode=sideways")
    frames = await expect_close(ws, 1008)
    assert frames[0]["error"]["code"] == "invalid_mode" and frames[1]["type"] == "session.closed"
    ws = await _open_v2(idle, mode="video", init={"config": {"tts_enabled": False}})
    assert (await recv_json(ws))["type"] == "session.created"
    audio = b64_pcm(np.asarray(clip.audio_chunks[0], dtype="<f4")[:17000])
    await send_json(ws, {"type": "input.append", "input": {"audio": audio, "video_frames": ["bm90IGpwZWc="]}})
    _warning(await recv_json(ws), "bad_frame")
    await send_json(ws, {"type": "session.close"})
    assert (await expect_close(ws, 1000))[-1]["type"] == "session.closed"


# ---- worker failure (last: it ends with the worker killed) -------------------------------------------

async def test_worker_failure_paths(idle, worker):
    # a worker that stops answering health (SIGSTOP) fails its session once worker_dead_after_s passes
    ws = await open_legacy(idle, "e2e_frozen", config=LISTEN_ONLY)
    os.kill(worker.process.pid, signal.SIGSTOP)
    try:
        frames = await expect_close(ws, 1011, timeout=20)
        assert frames[-1]["code"] == "worker_failed" and frames[-1]["fatal"] is True
        rt = await websockets.connect(f"{idle.ws}/v1/realtime?mode=audio")
        frames = await expect_close(rt, 1013)  # offline worker: no_worker, fatal for v2
        assert frames[0] == {"type": "error", "error": {"code": "no_worker", "message": "No worker available"}}
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
    wait_idle(idle)  # it answers again, frees the dropped session and takes work again

    v2 = await _open_v2(idle)
    assert (await recv_json(v2))["type"] == "session.created"
    worker.process.kill()  # the worker dies mid-session
    frames = await expect_close(v2, 1011)
    assert frames[0]["type"] == "error" and frames[0]["error"]["code"] == "worker_failed"
    assert frames[1]["type"] == "session.closed" and frames[1]["reason"] == "error"
    wait_until(lambda: http_json(f"{idle.http}/status")["workers_by_state"] == {"offline": 1})
    legacy = await connect(f"{idle.ws}/ws/duplex/e2e_nobody")
    frames = await expect_close(legacy, 1013)
    assert frames == [{"type": "error", "error": "No worker available", "code": "no_worker",
                       "message": "No worker available", "fatal": True}]
    assert json.loads(json.dumps(http_json(f"{idle.http}/workers")))["workers"][0]["state"] == "offline"
