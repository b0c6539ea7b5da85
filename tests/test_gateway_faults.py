"""Worker faults end to end: `python -m server.supervisor` runs one CPU worker (tiny, no compile, no
warm-up) behind a real gateway; the worker is killed (SIGKILL) or hung (SIGSTOP) by its pid in the
middle of a session. The client gets `worker_failed`, the supervisor restarts the worker, and a new
session runs. The worker also requires the gateway's shared secret on its internal WebSocket."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import websockets

from common.worker_secret import WORKER_SECRET_HEADER
from server.wait_workers import wait as wait_for_workers
from tests.gateway_helpers import (
    REPO,
    b64_pcm,
    expect_close,
    free_port,
    http_json,
    open_legacy,
    recv_json,
    send_json,
    spawn_python,
    start_gateway,
    stop_legacy,
    wait_idle,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WORKER_SECRET = "gateway-to-worker"
HANG_TIMEOUT_S = 8.0  # longer than the gateway needs to notice (5 s), so both are seen
LISTEN_ONLY = {"force_listen_count": 1000}
ONE_SECOND = np.zeros(16000, dtype=np.float32)


class SupervisedWorker:
    """The supervisor subprocess and where its worker lives."""

    def __init__(self, process: subprocess.Popen, run_dir: Path, url: str, log_path: Path) -> None:
        self.process = process
        self.run_dir = run_dir
        self.url = url
        self.log_path = log_path

    @property
    def worker_pid(self) -> int:
        return int((self.run_dir / "worker_0.pid").read_text())

    def wait_restarted(self, old_pid: int) -> None:
        """Until the pid file names a new process (the supervisor restarted the worker)."""
        def restarted() -> bool:
            pid_file = self.run_dir / "worker_0.pid"
            return pid_file.exists() and pid_file.read_text().strip() not in ("", str(old_pid))
        wait_until(restarted, timeout_s=30)


@pytest.fixture(scope="module")
def supervised(tmp_path_factory):
    folder = tmp_path_factory.mktemp("supervised")
    run_dir = folder / "run"
    port = free_port()
    config = {
        "model": {"preset": "tiny"},
        "service": {"host": "127.0.0.1", "worker_base_port": port, "compile": False, "warmup": False,
                    "run_dir": str(run_dir), "health_poll_s": 0.5,
                    "supervisor": {"hang_timeout_s": HANG_TIMEOUT_S, "backoff_initial_s": 0.5}},
        "auth": {"worker_secret": WORKER_SECRET},
    }
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(config))
    log_path = folder / "supervisor.log"
    process = spawn_python(["-m", "server.supervisor", "--config", str(config_path)], log_path)
    service = SupervisedWorker(process, run_dir, f"http://127.0.0.1:{port}", log_path)
    try:
        assert wait_for_workers([(service.url, process.pid)], timeout_s=120) == 0, log_path.read_text()
        yield service
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode == 0
    assert not list(run_dir.glob("*.pid")), "the supervisor removes its pid files when it stops"


@pytest.fixture(scope="module")
def gateway(supervised, tmp_path_factory):
    # Gateway defaults for failure detection (health every 1 s, offline after 5 s of silence).
    service = start_gateway(tmp_path_factory.mktemp("faults_gw"), [supervised.url],
                            f"auth.worker_secret={WORKER_SECRET}")
    yield service
    service.stop()


async def _session_with_one_result(gateway, session_id: str) -> websockets.ClientConnection:
    ws = await open_legacy(gateway, session_id, config=LISTEN_ONLY)
    await send_json(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(17000, dtype=np.float32))})
    result = await recv_json(ws, timeout=60)
    assert result["type"] == "result", result
    return ws


async def _new_session_works(gateway, session_id: str) -> None:
    ws = await _session_with_one_result(gateway, session_id)
    await send_json(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(ONE_SECOND)})
    assert (await recv_json(ws, timeout=60))["type"] == "result"
    await stop_legacy(ws)


async def test_worker_requires_the_gateway_secret(supervised):
    ws_url = supervised.url.replace("http://", "ws://") + "/ws/duplex?session_id=direct&kind=audio_duplex"
    async with websockets.connect(ws_url) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1008
    async with websockets.connect(ws_url, additional_headers={WORKER_SECRET_HEADER: WORKER_SECRET}) as ws:
        await send_json(ws, {"type": "prepare", "config": LISTEN_ONLY})
        assert (await recv_json(ws))["type"] == "prepared"
        await send_json(ws, {"type": "stop"})
        assert (await recv_json(ws))["type"] == "stopped"
    assert http_json(f"{supervised.url}/health")["status"] == "healthy", "health stays open"


async def test_killed_worker_fails_its_session_and_is_restarted(supervised, gateway):
    wait_idle(gateway)
    ws = await _session_with_one_result(gateway, "fault_kill")
    old_pid = supervised.worker_pid
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    frames = await expect_close(ws, 1011, timeout=10)
    assert frames[-1]["code"] == "worker_failed" and frames[-1]["fatal"] is True
    assert time.monotonic() - killed_at < 5.0

    supervised.wait_restarted(old_pid)
    wait_until(lambda: http_json(f"{gateway.http}/status")["idle_workers"] == 1, timeout_s=60)
    await _new_session_works(gateway, "fault_after_kill")
    assert "exited with status -9" in supervised.log_path.read_text()


async def test_hung_worker_fails_its_session_and_is_restarted(supervised, gateway):
    wait_idle(gateway)
    ws = await _session_with_one_result(gateway, "fault_hang")
    old_pid = supervised.worker_pid
    stopped_at = time.monotonic()
    os.kill(old_pid, signal.SIGSTOP)
    try:
        frames = await expect_close(ws, 1011, timeout=15)
        noticed_after = time.monotonic() - stopped_at
        assert frames[-1]["code"] == "worker_failed"
        assert noticed_after <= 5.5, f"the gateway noticed the hang after {noticed_after:.1f} s"
        # no new work for it: while it is down a new session is refused (the only worker is offline)
        assert http_json(f"{gateway.http}/status")["workers_by_state"] == {"offline": 1}
        legacy = await websockets.connect(f"{gateway.ws}/ws/duplex/fault_nobody")
        assert (await expect_close(legacy, 1013))[0]["code"] == "no_worker"
        supervised.wait_restarted(old_pid)
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone once the supervisor killed it
            os.kill(old_pid, signal.SIGCONT)
    assert "is hung: no /health answer for" in supervised.log_path.read_text()
    wait_until(lambda: http_json(f"{gateway.http}/status")["idle_workers"] == 1, timeout_s=60)
    await _new_session_works(gateway, "fault_after_hang")


def test_supervisor_gives_up_on_a_worker_that_cannot_start(tmp_path):
    with socket.socket() as taken:  # the worker's port is taken: every start fails
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = {"model": {"preset": "tiny"},
                  "service": {"host": "127.0.0.1", "worker_base_port": taken.getsockname()[1], "compile": False,
                              "warmup": False, "run_dir": str(tmp_path / "run"), "health_poll_s": 0.2,
                              "supervisor": {"backoff_initial_s": 0.1, "max_start_failures": 2}}}
        (tmp_path / "config.json").write_text(json.dumps(config))
        run = subprocess.run([sys.executable, "-m", "server.supervisor", "--config", str(tmp_path / "config.json")],
                             cwd=REPO, capture_output=True, text=True, timeout=90)
    assert run.returncode == 1, run.stderr
    assert "failed 2 starts in a row without getting ready; giving up" in run.stderr
    assert (tmp_path / "run" / "worker_0.log").read_text().count("=== supervisor: start #") == 2
    assert not list((tmp_path / "run").glob("*.pid"))
