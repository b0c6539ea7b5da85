"""Two CPU workers (tiny, no compile, no warm-up) behind one gateway: concurrent sessions go to
different workers, a third waits in the queue and starts on the worker the first one frees.
The CPU stand-in for the multi-GPU layout (one worker per GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import websockets

from tests.gateway_helpers import (
    b64_pcm,
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

LISTEN_ONLY = {"force_listen_count": 1000}


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_workers")
    services = [start_worker(folder, name=f"worker_{i}") for i in range(2)]
    yield services
    for service in services:
        service.stop()


@pytest.fixture(scope="module")
def gateway(workers, tmp_path_factory):
    service = start_gateway(tmp_path_factory.mktemp("two_workers_gw"), [w.http for w in workers],
                            "service.health_poll_s=0.2")
    yield service
    service.stop()


def _running(gateway) -> dict[str, int]:
    """session id -> worker index, from the gateway's /status."""
    return {s["session_id"]: s["worker"] for s in http_json(f"{gateway.http}/status")["running_sessions"]}


async def _one_unit(ws) -> None:
    await send_json(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(17000, dtype=np.float32))})
    result = await recv_json(ws, timeout=60)
    assert result["type"] == "result" and not result.get("buffered"), result


async def test_sessions_spread_over_workers_and_the_third_waits(gateway, workers):
    wait_idle(gateway, workers=2)
    first = await open_legacy(gateway, "two_a", config=LISTEN_ONLY)
    second = await open_legacy(gateway, "two_b", config=LISTEN_ONLY)
    running = _running(gateway)
    assert sorted(running.values()) == [0, 1] and set(running) == {"two_a", "two_b"}
    await _one_unit(first)
    await _one_unit(second)
    for index, worker in enumerate(workers):  # each worker runs exactly the session the gateway says
        health = http_json(f"{worker.http}/health")
        expected = next(session for session, at in running.items() if at == index)
        assert health["current_session_id"] == expected and health["worker_status"] == "duplex_active"

    third = await websockets.connect(f"{gateway.ws}/ws/duplex/two_c")
    queued = await recv_json(third)
    assert queued["type"] == "queued" and queued["position"] == 1
    assert http_json(f"{gateway.http}/status")["queue_length"] == 1

    freed = running["two_a"]
    await stop_legacy(first)
    assert (await recv_json(third, timeout=20))["type"] == "queue_done"
    await send_json(third, {"type": "prepare", "config": LISTEN_ONLY})
    assert (await recv_json(third))["type"] == "prepared"
    await _one_unit(third)
    assert _running(gateway) == {"two_b": 1 - freed, "two_c": freed}

    await stop_legacy(second)
    await stop_legacy(third)
    wait_until(lambda: http_json(f"{gateway.http}/status")["running_sessions"] == [])
    wait_idle(gateway, workers=2)
