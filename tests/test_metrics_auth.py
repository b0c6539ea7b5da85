"""Gateway/worker Prometheus metrics, API-key auth (HTTP and WebSocket) and the TLS cert script."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from fastapi import Depends, FastAPI, WebSocket
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.websockets import WebSocketDisconnect

from common.config import AuthConfig
from common.worker_secret import WORKER_SECRET_HEADER, worker_secret_headers, worker_secret_ok
from server.auth import ApiKeyAuth, reject_websocket
from server.metrics import GatewayMetrics
from workers.metrics import WorkerMetrics

REPO_ROOT = Path(__file__).resolve().parent.parent


def _families(client: TestClient) -> dict[str, list]:
    """GET /metrics, parse the exposition, return {family name: samples}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def _value(samples: list, name: str, **labels: str) -> float:
    matches = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return matches[0]


def test_gateway_metrics_exposition_after_session_and_units() -> None:
    metrics = GatewayMetrics()
    app = FastAPI()
    app.include_router(metrics.router())
    metrics.session_queued("omni_duplex", "legacy")
    metrics.session_left_queue("omni_duplex", "legacy", wait_s=2.5)
    metrics.session_started("omni_duplex", "legacy")
    metrics.session_started("audio_duplex", "realtime")
    metrics.session_ended("audio_duplex", "realtime")
    metrics.observe_unit({"is_listen": True, "wall_clock_ms": 120.0})
    metrics.observe_unit({"is_listen": False, "wall_clock_ms": 480.0, "units": 2})
    metrics.observe_unit({"is_listen": True, "buffered": True, "units": 0, "wall_clock_ms": 1.0})
    metrics.set_worker_state("w0", "idle")
    metrics.set_worker_state("w0", "duplex_active")
    metrics.error("bad_json")
    metrics.error("bad_json")

    families = _families(TestClient(app))

    sessions = families["omni_gateway_sessions"]
    assert _value(sessions, "omni_gateway_sessions_total", protocol="legacy", kind="omni_duplex") == 1
    assert _value(sessions, "omni_gateway_sessions_total", protocol="realtime", kind="audio_duplex") == 1
    active = families["omni_gateway_sessions_active"]
    assert _value(active, "omni_gateway_sessions_active", protocol="legacy", kind="omni_duplex") == 1
    assert _value(active, "omni_gateway_sessions_active", protocol="realtime", kind="audio_duplex") == 0
    queued = families["omni_gateway_sessions_queued"]
    assert _value(queued, "omni_gateway_sessions_queued", protocol="legacy", kind="omni_duplex") == 0
    wait = families["omni_gateway_queue_wait_seconds"]
    assert _value(wait, "omni_gateway_queue_wait_seconds_count") == 1
    assert _value(wait, "omni_gateway_queue_wait_seconds_sum") == pytest.approx(2.5)
    latency = families["omni_gateway_unit_wall_clock_seconds"]
    assert _value(latency, "omni_gateway_unit_wall_clock_seconds_count") == 2  # the buffered one is skipped
    assert _value(latency, "omni_gateway_unit_wall_clock_seconds_sum") == pytest.approx(0.6)
    assert _value(latency, "omni_gateway_unit_wall_clock_seconds_bucket", le="0.15") == 1
    units = families["omni_gateway_units"]
    assert _value(units, "omni_gateway_units_total", decision="listen") == 1
    assert _value(units, "omni_gateway_units_total", decision="speak") == 2
    states = families["omni_gateway_worker_state"]
    assert _value(states, "omni_gateway_worker_state", worker="w0", state="idle") == 0
    assert _value(states, "omni_gateway_worker_state", worker="w0", state="duplex_active") == 1
    assert _value(families["omni_gateway_errors"], "omni_gateway_errors_total", code="bad_json") == 2


def test_worker_metrics_exposition_and_separate_registries() -> None:
    metrics = WorkerMetrics()
    other = WorkerMetrics()  # a second instance must not clash (private registries)
    app = FastAPI()
    app.include_router(metrics.router())
    for phase, seconds in (("load", 3.0), ("compile", 40.0), ("warmup", 7.5)):
        metrics.observe_start_phase(phase, seconds)
    metrics.record_compile_cache(hits=5, misses=2)
    metrics.set_state("loading")
    metrics.set_state("idle")
    metrics.session_started()
    metrics.observe_unit(True, {"prefill": 30.0, "audio": 10.0, "llm": 5.0, "generate": 6.0, "unknown": 1.0})
    metrics.observe_unit(False, {"prefill": 32.0, "llm": 90.0, "tts": 60.0, "token2wav": 40.0, "vision": 8.0})
    metrics.observe_finalize(0.004)
    metrics.error("internal_error")
    other.session_started()

    families = _families(TestClient(app))

    stages = families["omni_worker_unit_stage_seconds"]
    assert _value(stages, "omni_worker_unit_stage_seconds_count", stage="prefill") == 2
    assert _value(stages, "omni_worker_unit_stage_seconds_sum", stage="llm") == pytest.approx(0.095)
    for stage in ("vision", "audio", "tts", "token2wav", "finalize"):
        assert _value(stages, "omni_worker_unit_stage_seconds_count", stage=stage) == 1
    assert not [s for s in stages if s.labels.get("stage") == "unknown"]
    units = families["omni_worker_units"]
    assert _value(units, "omni_worker_units_total", decision="listen") == 1
    assert _value(units, "omni_worker_units_total", decision="speak") == 1
    assert _value(families["omni_worker_state"], "omni_worker_state", state="idle") == 1
    assert _value(families["omni_worker_state"], "omni_worker_state", state="loading") == 0
    assert _value(families["omni_worker_start_phase_seconds"], "omni_worker_start_phase_seconds",
                  phase="compile") == 40.0
    cache = families["omni_worker_compile_cache"]
    assert _value(cache, "omni_worker_compile_cache_total", result="hit") == 5
    assert _value(cache, "omni_worker_compile_cache_total", result="miss") == 2
    assert _value(families["omni_worker_sessions"], "omni_worker_sessions_total") == 1
    assert _value(families["omni_worker_errors"], "omni_worker_errors_total", code="internal_error") == 1
    with pytest.raises(ValueError, match="unknown start phase"):
        metrics.observe_start_phase("download", 1.0)


def _auth_app(auth: ApiKeyAuth) -> FastAPI:
    app = FastAPI()

    @app.get("/private", dependencies=[Depends(auth)])
    def private() -> dict:
        return {"ok": True}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        check = auth.check_websocket(websocket)
        if not check.ok:
            await reject_websocket(websocket, check.subprotocol, {"type": "error", "code": "unauthorized"})
            return
        await websocket.accept(subprotocol=check.subprotocol)
        await websocket.send_json({"type": "hello", "subprotocol": check.subprotocol})
        await websocket.close()

    return app


def test_http_dependency_rejects_missing_and_wrong_keys(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# operators\nfile-key-1\n\n  file-key-2  # laptop\n")
    auth = ApiKeyAuth.from_config(AuthConfig(api_keys=["cfg-key"], api_keys_file=str(keys_file)))
    client = TestClient(_auth_app(auth))

    missing = client.get("/private")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert client.get("/private", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/private", headers={"Authorization": "Basic cfg-key"}).status_code == 401
    assert client.get("/private", params={"api_key": "cfg-key-longer"}).status_code == 401
    assert client.get("/private", headers={"Authorization": "Bearer cfg-key"}).status_code == 200
    assert client.get("/private", params={"api_key": "file-key-1"}).status_code == 200
    assert client.get("/private", params={"token": "file-key-2"}).json() == {"ok": True}


def test_auth_is_off_without_keys() -> None:
    auth = ApiKeyAuth.from_config(AuthConfig())
    assert not auth.enabled
    assert TestClient(_auth_app(auth)).get("/private").status_code == 200


def test_websocket_check_closes_1008_on_bad_key_and_accepts_good_ones() -> None:
    client = TestClient(_auth_app(ApiKeyAuth(["sesame"])))

    for url, kwargs in (("/ws", {}), ("/ws?api_key=wrong", {}), ("/ws", {"subprotocols": ["map-api-key.x"]})):
        with client.websocket_connect(url, **kwargs) as ws:
            assert ws.receive_json() == {"type": "error", "code": "unauthorized"}
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1008

    with client.websocket_connect("/ws", headers={"Authorization": "Bearer sesame"}) as ws:
        assert ws.receive_json() == {"type": "hello", "subprotocol": None}
    with client.websocket_connect("/ws?token=sesame") as ws:
        assert ws.receive_json()["type"] == "hello"
    with client.websocket_connect("/ws", subprotocols=["map-api-key.sesame"]) as ws:
        assert ws.receive_json()["subprotocol"] == "map-api-key.sesame"
    with client.websocket_connect(
        "/ws", subprotocols=["map.realtime"], headers={"Authorization": "Bearer sesame"}
    ) as ws:
        assert ws.receive_json()["subprotocol"] == "map.realtime"


def test_worker_secret_helpers() -> None:
    headers = worker_secret_headers("s3cret")
    assert headers == {WORKER_SECRET_HEADER: "s3cret"}
    assert worker_secret_ok(headers, "s3cret")
    assert not worker_secret_ok({WORKER_SECRET_HEADER: "other"}, "s3cret")
    assert not worker_secret_ok({}, "s3cret")
    assert worker_secret_ok({}, None)
    assert worker_secret_headers(None) == {}


@pytest.mark.slow
def test_make_cert_script_produces_a_loadable_pair(tmp_path: Path) -> None:
    out_dir = tmp_path / "certs"
    run = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "make_cert.sh"), str(out_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    cert, key = out_dir / "server.crt", out_dir / "server.key"
    assert key.stat().st_mode & 0o077 == 0, "private key must not be readable by others"
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    for host in ("localhost", "127.0.0.1"):  # the SAN entries: a verifying client accepts both names
        _tls_handshake_in_memory(server_context, cert, host)
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake_in_memory(server_context, cert, "example.org")


def _tls_handshake_in_memory(server_context: ssl.SSLContext, ca_file: Path, hostname: str) -> None:
    """Run a full TLS handshake between a verifying client and the server, over memory BIOs."""
    client_context = ssl.create_default_context(cafile=str(ca_file))
    pipes = {side: (ssl.MemoryBIO(), ssl.MemoryBIO()) for side in ("client", "server")}
    client = client_context.wrap_bio(*pipes["client"], server_hostname=hostname)
    server = server_context.wrap_bio(*pipes["server"], server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, tls in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    tls.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        # Move bytes written by each side into the other side's incoming BIO.
        pipes["server"][0].write(pipes["client"][1].read())
        pipes["client"][0].write(pipes["server"][1].read())
        if all(done.values()):
            return
    raise AssertionError("TLS handshake did not complete")
