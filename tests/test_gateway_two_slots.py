"""Two sessions at once on ONE worker with two KV slots (`service.sessions_per_worker = 2`).

Real gateway and CPU worker (tiny preset, compile and warm-up off). Both sessions start without
queueing and are served concurrently, a third waits at position 1 and starts when a slot frees, and a
greedy session's per-unit results are the same beside another session as alone. (With random tiny
weights greedy tokens hardly depend on context, so slot isolation itself is proven on the KV caches
in tests/test_engine_slots.py.)
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.gateway_helpers import (
    b64_pcm,
    connect,
    http_json,
    open_legacy,
    recv_json,
    send_json,
    start_gateway,
    start_worker,
    stop_legacy,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SLOTS = "service.sessions_per_worker=2"
GREEDY = {"decode_mode": "greedy", "force_listen_count": 0, "seed": 0,
          "max_new_speak_tokens_per_chunk": 4}
UNITS = 3


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("two_slots")
    worker = start_worker(log_dir, "--set", SLOTS)
    gateway = start_gateway(log_dir, [worker.http], SLOTS)
    try:
        wait_until(lambda: http_json(f"{gateway.http}/status")["idle_workers"] == 1)
        yield gateway
    finally:
        gateway.stop()
        worker.stop()


def _chunk(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(16_000) * 0.1).astype(np.float32)


async def _run_units(ws, seed: int) -> list[tuple]:
    """Stream UNITS one-second chunks; each unit's decision, text and counts."""
    out = []
    for unit in range(UNITS):
        await send_json(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(_chunk(seed + unit))})
        result = await recv_json(ws, timeout=120)
        assert result["type"] == "result", result
        out.append((result["is_listen"], result["text"], result["n_tokens"], result["n_tts_tokens"],
                    result["kv_cache_length"]))
    return out


async def test_two_sessions_share_one_worker_and_a_third_queues(gateway):
    alone_ws = await open_legacy(gateway, "slot_alone", config=GREEDY)
    alone = await _run_units(alone_ws, seed=1)
    await stop_legacy(alone_ws)
    wait_until(lambda: http_json(f"{gateway.http}/status")["idle_workers"] == 1)

    first = await open_legacy(gateway, "slot_a", config=GREEDY)
    second = await open_legacy(gateway, "slot_b", config=GREEDY)  # no queue: the worker's second slot
    third = await connect(f"{gateway.ws}/ws/duplex/slot_c")
    queued = await recv_json(third)
    assert queued["type"] == "queued" and queued["position"] == 1, queued

    beside, _ = await asyncio.gather(_run_units(first, seed=1), _run_units(second, seed=100))
    assert any(not is_listen for is_listen, *_ in alone), alone  # speech covers TTS and vocoder state
    assert beside == alone, "a session's greedy results changed while another ran on the other slot"

    await stop_legacy(first)
    while (frame := await recv_json(third, timeout=60))["type"] == "queue_update":
        pass
    assert frame["type"] == "queue_done"
    await send_json(third, {"type": "prepare", "config": GREEDY})
    assert (await recv_json(third, timeout=60))["type"] == "prepared"
    assert len(await _run_units(third, seed=5)) == UNITS
    await stop_legacy(third)
    await stop_legacy(second)
