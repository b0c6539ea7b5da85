"""Shared by the gateway end-to-end tests: real worker and gateway subprocesses, small WS clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets

from server.wait_workers import wait as wait_for_workers

REPO = Path(__file__).resolve().parent.parent
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
# Fast CPU worker: no torch.compile, no MP4 warm-up pass.
WORKER_ARGS = ["--host", "127.0.0.1", "--set", "model.preset=tiny", "--set", "service.compile=false",
               "--set", "service.warmup=false"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """A started subprocess and where it listens."""

    process: subprocess.Popen
    http: str
    log_path: Path

    @property
    def ws(self) -> str:
        return self.http.replace("http://", "ws://")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def set_args(settings: Iterable[str]) -> list[str]:
    """`--set KEY=VALUE` command-line arguments for config overrides."""
    return [arg for setting in settings for arg in ("--set", setting)]


def spawn_python(args: list[str], log_path: Path) -> subprocess.Popen:
    """`python <args>` in the repository, its stdout and stderr written to `log_path`."""
    with log_path.open("w") as log:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def start_worker(log_dir: Path, *extra: str, name: str = "worker") -> Service:
    port = free_port()
    log_path = log_dir / f"{name}.log"
    process = spawn_python(["-m", "workers.worker", "--port", str(port), *WORKER_ARGS, *extra], log_path)
    service = Service(process, f"http://127.0.0.1:{port}", log_path)
    if wait_for_workers([(service.http, process.pid)], timeout_s=240) != 0:
        service.stop()
        pytest.fail(f"worker did not start:\n{service.log_tail()}")
    return service


def http_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def start_gateway(log_dir: Path, worker_urls: list[str], *settings: str, name: str = "gateway") -> Service:
    port = free_port()
    log_path = log_dir / f"{name}.log"
    args = ["-m", "server", "--host", "127.0.0.1", "--port", str(port), *set_args(settings)]
    for url in worker_urls:
        args += ["--worker-url", url]
    service = Service(spawn_python(args, log_path), f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if http_json(f"{service.http}/health")["status"] == "healthy":
                return service
        if service.process.poll() is not None:
            break
        time.sleep(0.2)
    service.stop()
    pytest.fail(f"gateway did not start:\n{service.log_tail()}")


@contextlib.contextmanager
def running_stack(log_dir: Path) -> Iterator[str]:
    """A worker and a gateway in front of it, the worker idle; yields the gateway's http URL."""
    worker = start_worker(log_dir)
    try:
        gateway = start_gateway(log_dir, [worker.http])
        try:
            wait_idle(gateway)
            yield gateway.http
        finally:
            gateway.stop()
    finally:
        worker.stop()


def wait_until(predicate, timeout_s: float = 20.0, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval_s)


def wait_idle(gateway: Service, workers: int = 1) -> None:
    wait_until(lambda: http_json(f"{gateway.http}/status")["idle_workers"] == workers)


def b64_pcm(samples: np.ndarray) -> str:
    return base64.b64encode(np.asarray(samples, dtype="<f4").tobytes()).decode("ascii")


def decode_pcm(data: str) -> np.ndarray:
    raw = base64.b64decode(data)
    assert len(raw) % 4 == 0
    return np.frombuffer(raw, dtype="<f4")


async def connect(url: str) -> websockets.ClientConnection:
    return await websockets.connect(url, max_size=MAX_MESSAGE_BYTES, open_timeout=30)


async def recv_json(ws: websockets.ClientConnection, timeout: float = 60.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def send_json(ws: websockets.ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


async def expect_close(ws: websockets.ClientConnection, code: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Read until the server closes; asserts the close code and returns the frames read on the way."""
    frames = []
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    assert ws.close_code == code, (ws.close_code, ws.close_reason, frames)
    return frames


async def open_legacy(gateway: Service, session_id: str, **prepare: Any) -> websockets.ClientConnection:
    """A legacy session past queue_done and prepared."""
    ws = await connect(f"{gateway.ws}/ws/duplex/{session_id}")
    assert (await recv_json(ws))["type"] == "queue_done"
    await send_json(ws, {"type": "prepare", **prepare})
    prepared = await recv_json(ws)
    assert prepared["type"] == "prepared", prepared
    return ws


async def stop_legacy(ws: websockets.ClientConnection) -> None:
    await send_json(ws, {"type": "stop"})
    frames = await expect_close(ws, 1000)
    assert frames[-1] == {"type": "stopped"} or frames[-1]["type"] == "stopped"
