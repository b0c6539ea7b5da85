"""API keys on the real gateway app: which routes are open, 401 on HTTP, 1008 on both WebSocket
protocols before anything is queued, and the key accepted from a header, the query or a subprotocol.

The app runs in-process (Starlette's test client) with one worker URL that nothing listens on, so a
session that passes auth ends with `no_worker`, which proves it got past the check."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from common.config import ServiceConfig
from server.app import create_app
from tests.gateway_helpers import free_port

KEY = "operator-key"
PROTECTED = ("/status", "/workers", "/api/queue", "/api/default_ref_audio", "/metrics")


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    config = ServiceConfig.model_validate({"auth": {"api_keys": [KEY]}})
    with TestClient(create_app(config, [f"127.0.0.1:{free_port()}"])) as test_client:
        yield test_client


def test_open_routes_need_no_key(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "healthy"
    assert client.get("/").status_code == 200
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize("name", ["%00", "x" * 5000, "..%2F..%2Fetc%2Fpasswd", "missing.js"],
                         ids=["nul", "too-long", "traversal", "missing"])
def test_static_files_that_cannot_exist_are_404(client: TestClient, name: str) -> None:
    assert client.get(f"/static/{name}").status_code == 404


@pytest.mark.parametrize("path", PROTECTED)
def test_protected_routes_answer_401_without_a_valid_key(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code in (200, 404)
    assert client.get(path, params={"api_key": KEY}).status_code in (200, 404)


def _close_code(ws) -> tuple[list[dict], int]:
    frames = []
    with pytest.raises(WebSocketDisconnect) as closed:
        while True:
            frames.append(ws.receive_json())
    return frames, closed.value.code


def test_legacy_websocket_without_key_is_closed_1008(client: TestClient) -> None:
    with client.websocket_connect("/ws/duplex/no_key") as ws:
        frames, code = _close_code(ws)
    assert code == 1008
    assert frames == [{"type": "error", "error": "Invalid or missing API key", "code": "unauthorized",
                       "message": "Invalid or missing API key", "fatal": True}]


def test_realtime_websocket_with_wrong_key_is_closed_1008(client: TestClient) -> None:
    headers = {"Authorization": "Bearer wrong"}
    with client.websocket_connect("/v1/realtime?mode=audio", subprotocols=["map.realtime"], headers=headers) as ws:
        frames, code = _close_code(ws)
    assert code == 1008
    assert frames == [{"type": "error", "error": {"code": "unauthorized", "message": "Invalid or missing API key"}}]


@pytest.mark.parametrize("how", ["header", "query", "subprotocol"])
def test_valid_key_passes_to_admission(client: TestClient, how: str) -> None:
    url, kwargs = "/ws/duplex/with_key", {}
    if how == "header":
        kwargs["headers"] = {"Authorization": f"Bearer {KEY}"}
    elif how == "query":
        url += f"?api_key={KEY}"
    else:
        kwargs["subprotocols"] = [f"map-api-key.{KEY}"]
    with client.websocket_connect(url, **kwargs) as ws:
        frames, code = _close_code(ws)
    assert code == 1013 and frames[0]["code"] == "no_worker"


def test_unauthorized_attempts_are_counted(client: TestClient) -> None:
    with client.websocket_connect("/ws/duplex/counted") as ws:
        _close_code(ws)
    metrics = client.get("/metrics", params={"api_key": KEY}).text
    line = next(line for line in metrics.splitlines()
                if line.startswith('omni_gateway_errors_total{code="unauthorized"}'))
    assert float(line.split()[-1]) >= 1
