"""PROTOCOL.md §4 row 26: an exception in the model mid-session is a fatal `internal_error`, close 1011,
and the worker frees the session and serves the next one; through the gateway, on the legacy protocol
the same frame and close, on realtime v2 `error` + `session.closed {reason: "error"}` and close 1011.

Nothing honest makes the tiny model raise on its own, so the failure is injected: the worker runs in
this process (uvicorn on a thread, the real app and engine), and the test corrupts the live session's
KV position so that the runner's own bounds check raises in the middle of the next unit's prefill,
as an out-of-memory error or a bug would. Everything else is real: the socket, the session loop, the
release of the slot, the next session on the same worker.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from common.config import ServiceConfig
from tests.gateway_helpers import (
    Service,
    b64_pcm,
    expect_close,
    free_port,
    http_json,
    open_legacy,
    recv_json,
    send_json,
    start_gateway,
    wait_idle,
)
from workers.worker import Worker

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def in_process_worker() -> Iterator[tuple[Worker, int]]:
    cfg = ServiceConfig.model_validate({
        "model": {"preset": "tiny", "device": "cpu"},
        "service": {"host": "127.0.0.1", "compile": False, "warmup": False},
    })
    port = free_port()
    worker = Worker(cfg, port=port)
    server = uvicorn.Server(uvicorn.Config(worker.build_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        status = None
        while time.monotonic() < deadline and status not in ("idle", "error"):
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5.0).json()["worker_status"]
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert status == "idle", status
        yield worker, port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def gateway(in_process_worker, tmp_path_factory) -> Iterator[Service]:
    _, port = in_process_worker
    service = start_gateway(tmp_path_factory.mktemp("gateway"), [f"http://127.0.0.1:{port}"])
    try:
        wait_idle(service)
        yield service
    finally:
        service.stop()


def _break_the_live_session(worker: Worker) -> None:
    """The open session's next unit exceeds its KV slot, so the runner's bounds check raises ValueError.
    (No name is kept for the session: the worker must be left holding its last reference. Closed sessions
    of earlier tests can linger in the weak set while pytest's log capture holds their tracebacks.)"""
    (session,) = [session for session in worker.live_sessions if not session.closed]
    session.position = 10**9


async def _wait_released(worker: Worker, session_id: str) -> None:
    """Until the worker has released `session_id`'s slot and reports idle (pytest's log capture keeps the
    failed unit's traceback, and with it the session object, so live sessions are not counted here; the
    clean path checks that count)."""
    deadline = time.monotonic() + 30
    while (worker.last_cleanup or {}).get("session_id") != session_id or worker.worker_status != "idle":
        assert time.monotonic() < deadline, worker.health()
        await asyncio.sleep(0.05)


async def _prepared_session(port: int, session_id: str):
    ws = await connect(f"ws://127.0.0.1:{port}/ws/duplex?session_id={session_id}", max_size=None)
    await ws.send(json.dumps({"type": "prepare", "config": {"force_listen_count": 100}}))
    assert json.loads(await ws.recv())["type"] == "prepared"
    return ws


async def _one_unit(ws) -> dict:
    await ws.send(json.dumps({"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(16000))}))
    return json.loads(await asyncio.wait_for(ws.recv(), timeout=60))


async def test_injected_model_exception_is_fatal_internal_error_and_the_worker_serves_the_next_session(
    in_process_worker,
):
    worker, port = in_process_worker
    ws = await _prepared_session(port, "row26_failing")
    assert (await _one_unit(ws))["units"] == 1
    _break_the_live_session(worker)
    reply = await _one_unit(ws)
    assert reply["type"] == "error" and reply["code"] == "internal_error" and reply["fatal"] is True
    assert reply["chunk_index"] == 1
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), timeout=15)
    assert closed.value.rcvd.code == 1011
    await _wait_released(worker, "row26_failing")
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text
    assert 'omni_worker_errors_total{code="internal_error"}' in metrics

    ws = await _prepared_session(port, "row26_next")
    result = await _one_unit(ws)
    assert result["type"] == "result" and result["units"] == 1 and result["current_time"] == 1
    await ws.send(json.dumps({"type": "stop"}))
    assert json.loads(await ws.recv()) == {"type": "stopped"}
    await ws.close()


async def test_injected_model_exception_through_the_gateway_closes_legacy_and_realtime_sessions_1011(
    in_process_worker, gateway,
):
    worker, _ = in_process_worker
    legacy = await open_legacy(gateway, "row26_legacy", config={"force_listen_count": 100})
    await send_json(legacy, {"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(16000))})
    assert (await recv_json(legacy))["type"] == "result"
    _break_the_live_session(worker)
    await send_json(legacy, {"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(16000))})
    frames = await expect_close(legacy, 1011)
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "internal_error" and frames[-1]["fatal"] is True
    await _wait_released(worker, "row26_legacy")
    wait_idle(gateway)  # the gateway takes the worker back: it reports idle, nothing marked it failed

    realtime = await connect(f"{gateway.ws}/v1/realtime?mode=audio", max_size=None)
    assert (await recv_json(realtime))["type"] == "session.queue_done"
    await send_json(realtime, {"type": "session.init", "payload": {}})
    assert (await recv_json(realtime))["type"] == "session.created"
    _break_the_live_session(worker)
    await send_json(realtime, {"type": "input.append", "input": {"audio": b64_pcm(np.zeros(16000))}})
    frames = await expect_close(realtime, 1011)
    assert frames[0]["type"] == "error" and frames[0]["error"]["code"] == "internal_error", frames
    assert frames[1]["type"] == "session.closed" and frames[1]["reason"] == "error", frames
    wait_idle(gateway)
    assert http_json(f"{gateway.http}/status")["workers_by_state"] == {"idle": 1}
