"""A session type the operator disabled (`service.session_types`) is refused with close 1008 on both
protocols, before anything is queued (PROTOCOL.md §1.10); the enabled type gets past the check.

The real gateway runs as a process with one worker URL that nothing listens on, spoken to over real
WebSockets: a session of the enabled type then ends with `no_worker`, which proves it was admitted as far
as the pool."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
import websockets

from tests.gateway_helpers import Service, expect_close, free_port, http_json, start_gateway

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def omni_only_gateway(tmp_path_factory) -> Iterator[Service]:
    service = start_gateway(tmp_path_factory.mktemp("types"), [f"http://127.0.0.1:{free_port()}"],
                            'service.session_types=["omni_duplex"]')
    yield service
    service.stop()


async def test_disabled_session_type_is_closed_1008_on_both_protocols(omni_only_gateway: Service) -> None:
    message = "audio_duplex sessions are disabled on this server"
    legacy = await websockets.connect(f"{omni_only_gateway.ws}/ws/duplex/adx_caller")
    frames = await expect_close(legacy, 1008)
    assert frames == [{"type": "error", "error": message, "code": "type_disabled", "message": message,
                       "fatal": True}]
    realtime = await websockets.connect(f"{omni_only_gateway.ws}/v1/realtime?mode=audio")
    frames = await expect_close(realtime, 1008)
    assert frames[0] == {"type": "error", "error": {"code": "type_disabled", "message": message}}
    assert frames[1]["type"] == "session.closed" and frames[1]["reason"] == "error"
    assert http_json(f"{omni_only_gateway.http}/api/queue")["queue_length"] == 0
    with urllib.request.urlopen(f"{omni_only_gateway.http}/metrics", timeout=5) as response:
        assert 'omni_gateway_errors_total{code="type_disabled"} 2.0' in response.read().decode()


async def test_enabled_session_type_passes_the_check(omni_only_gateway: Service) -> None:
    for url in (f"{omni_only_gateway.ws}/ws/duplex/omni_caller", f"{omni_only_gateway.ws}/v1/realtime?mode=video"):
        ws = await websockets.connect(url)
        frames = await expect_close(ws, 1013)
        assert "no_worker" in str(frames[0]), frames
