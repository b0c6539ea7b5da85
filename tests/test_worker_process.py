"""The worker as a real process (tiny preset, CPU, torch.compile on), and precompile.py.

One module-scoped run: `precompile.py` fills a fresh compile cache, then one worker starts on it (its
/health must go loading -> compiling -> warming -> idle and report cache hits with the same greedy
warm-up tokens), and every WebSocket test talks to that worker over a real socket.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from common.config import REPO_ROOT
from tests.gateway_helpers import b64_pcm, free_port, set_args
from workers.media import load_media

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300.0
IDLE_TIMEOUT_S = 8.0
WARMUP_UNITS = 4  # 3 listening units + 1 speaking unit of the forced warm-up schedule
# A cold CPU compile of all four default backbones takes minutes on 2 cores (precompile.py measures it);
# the test compiles the LLM backbone with dynamic shapes, which exercises the same cache and phases.
BASE_SETTINGS = [
    "model.preset=tiny",
    "model.device=cpu",
    "service.compile=true",
    "service.host=127.0.0.1",
    f"service.warmup_seconds={WARMUP_UNITS}",
    'compile.modules=["llm"]',
    "compile.dynamic=true",
]


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path
    states: list[str] = field(default_factory=list)
    refusal_while_starting: dict | None = None

    def health(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5.0).json()

    def ws_url(self, session_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/duplex?session_id={session_id}&kind=omni_duplex"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compile_cache")


@pytest.fixture(scope="module")
def precompiled(cache_dir: Path) -> dict:
    """precompile.py on a fresh cache directory: exit code, its JSON summary and the wall time."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "precompile.py", *set_args([*BASE_SETTINGS, f"compile.cache_dir={cache_dir}"])],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"summary": json.loads(done.stdout), "wall_s": time.monotonic() - started, "log": done.stderr}


async def close_code(url: str) -> int:
    async with connect(url, max_size=None) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    return closed.value.rcvd.code


async def refusal_message(url: str, headers: dict[str, str] | None = None) -> tuple[dict, int]:
    async with connect(url, max_size=None, additional_headers=headers) as ws:
        message = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    return message, closed.value.rcvd.code


@pytest.fixture(scope="module")
def worker(precompiled: dict, cache_dir: Path, tmp_path_factory) -> Iterator[WorkerProcess]:
    """A worker on the precompiled cache; records every worker_status it reports while starting."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    settings = [
        *BASE_SETTINGS,
        f"compile.cache_dir={cache_dir}",
        f"service.limits.idle_timeout_s={IDLE_TIMEOUT_S}",
        "duplex.context_policy=none",  # lets a session fill its KV cap (context_full test)
    ]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers.worker", "--port", str(port), *set_args(settings)],
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    handle = WorkerProcess(process, port, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert process.poll() is None, handle.log()[-3000:]
            try:
                health = handle.health()
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            if not handle.states or handle.states[-1] != health["worker_status"]:
                handle.states.append(health["worker_status"])
            if health["worker_status"] in ("idle", "error"):
                break
            if handle.refusal_while_starting is None:
                handle.refusal_while_starting = asyncio.run(refusal_message(handle.ws_url("early")))
            time.sleep(0.05)
        assert handle.states[-1] == "idle", (handle.states, handle.log()[-3000:])
        yield handle
    finally:
        process.terminate()
        process.wait(timeout=30)


# ------------------------------------------------------------------------------------------------


def test_bad_config_value_exits_nonzero_naming_the_key():
    for setting, key in (("compile.mode=fastest", "compile.mode"), ("model.presett=tiny", "model.presett")):
        done = subprocess.run(
            [sys.executable, "-m", "workers.worker", "--set", setting],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0
        assert key in done.stderr


def test_failed_start_reports_error_with_the_reason(tmp_path):
    port = free_port()
    missing = tmp_path / "no_checkpoint_here"
    settings = [
        "service.host=127.0.0.1",
        "model.device=cpu",
        f"model.model_path={missing}",
        "auth.worker_secret=s3cret",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.worker", "--port", str(port), *set_args(settings)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    handle = WorkerProcess(process, port, tmp_path / "unused.log")
    try:
        deadline = time.monotonic() + 120
        health: dict = {}
        while time.monotonic() < deadline and health.get("status") != "error":
            assert process.poll() is None, "the worker exited instead of reporting the error"
            try:
                health = handle.health()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert health["status"] == "error" and health["worker_status"] == "error"
        assert "no_checkpoint_here" in health["error"] and health["progress"]["phase"] == "loading"
        message, code = asyncio.run(
            refusal_message(handle.ws_url("too_early"), {"X-Worker-Secret": "s3cret"})
        )
        assert code == 1013 and message["code"] == "not_ready"
        assert asyncio.run(close_code(handle.ws_url("no_secret"))) == 1008
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_precompile_fills_the_cache(precompiled, cache_dir):
    summary = precompiled["summary"]
    assert summary["cache"]["misses"] > 0 and summary["cache"]["verdict"] in ("miss", "partial")
    assert summary["engine"]["preset"] == "tiny" and summary["engine"]["weights"] == "random"
    assert any(p.is_file() for p in (cache_dir / "fxgraph").rglob("*")), "no FX graphs in the cache"
    record = json.loads((cache_dir / "precompile.json").read_text())
    assert record["cold_compile_s"] == summary["compile_s"] > 0
    assert len(summary["warmup_tokens"]) == WARMUP_UNITS
    assert f"unit={WARMUP_UNITS}/{WARMUP_UNITS} prefill: vision=" in precompiled["log"]
    assert "| SPEAK" in precompiled["log"]


def test_worker_start_phases_cache_hits_and_same_tokens(worker, precompiled):
    assert worker.states == ["loading", "compiling", "warming", "idle"]
    message, code = worker.refusal_while_starting
    assert code == 1013 and message["type"] == "error" and message["code"] == "not_ready"

    health = worker.health()
    assert health["status"] == "healthy" and health["model_loaded"] is True and health["state"] == "idle"
    assert (health["preset"], health["weights"], health["device"]) == ("tiny", "random", "cpu")
    assert health["compiled"] is True
    cache = health["compile"]["cache"]
    assert cache["hits"] > 0 and cache["misses"] == 0 and cache["verdict"] == "hit", cache
    assert health["compile"]["cold_compile_s"] == precompiled["summary"]["compile_s"]
    assert set(health["phase_times_s"]) == {"loading", "compiling", "warming"}
    assert health["warmup"]["compile_pass"]["tokens"] == precompiled["summary"]["warmup_tokens"]
    assert health["warmup"]["warm_pass"]["speak_units"] == 1
    assert health["progress"]["fraction"] == 1.0 and health["recompiles_since_ready"] == 0
    metrics = httpx.get(f"http://127.0.0.1:{worker.port}/metrics", timeout=5.0).text
    assert 'omni_worker_compile_cache_total{result="hit"}' in metrics
    assert 'omni_worker_start_phase_seconds{phase="compile"}' in metrics
    assert "compiled kernels loaded from the cache" in worker.log()
    assert "a cold compile took" in worker.log()


async def send(ws: ClientConnection, message: dict) -> dict:
    await ws.send(json.dumps(message))
    return json.loads(await ws.recv())


async def expect_close(ws: ClientConnection) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), timeout=15)
    return closed.value.rcvd.code


async def test_bad_inputs_keep_the_session(worker):
    async with connect(worker.ws_url("e2e_bad"), max_size=None) as ws:
        reply = await send(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(16000))})
        assert (reply["type"], reply["code"], reply["chunk_index"]) == ("error", "not_prepared", 0)
        await ws.send("{not json")
        assert json.loads(await ws.recv())["code"] == "bad_json"
        reply = await send(ws, {"type": "prepare", "config": {"temperature": 9}})
        assert (
            reply["code"] == "invalid_config" and "temperature" in reply["error"] and reply["fatal"] is False
        )
        prepared = await send(
            ws, {"type": "prepare", "config": {"decode_mode": "greedy", "listen_audio": "empty"}}
        )
        assert (
            prepared["type"] == "prepared" and prepared["prompt_tokens"] > 0 and prepared["prompt_length"] > 0
        )
        assert (await send(ws, {"type": "prepare"}))["code"] == "already_prepared"
        reply = await send(ws, {"type": "audio_chunk"})
        assert (reply["code"], reply["error"]) == ("missing_audio", "Missing audio_base64")
        reply = await send(ws, {"type": "video_frame"})
        assert (reply["code"], reply["error"]) == ("unknown_type", "Unknown message type: video_frame")
        await ws.send(b"\x00\x01")
        assert json.loads(await ws.recv())["code"] == "binary_frame"

        short = await send(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(8000))})
        assert short["type"] == "result" and short["buffered"] is True and short["units"] == 0
        assert short["current_time"] == 0 and short["audio_data"] == ""
        long = await send(ws, {"type": "audio_chunk", "audio": b64_pcm(np.full(40000, 0.01))})
        assert long["type"] == "result" and long["units"] == 3 and long["current_time"] == 3
        assert long["is_listen"] is True and long["audio_data"] == "" and long["kv_cache_length"] > 0

        assert (await send(ws, {"type": "pause", "timeout": 30})) == {"type": "paused", "timeout": 30.0}
        assert (await send(ws, {"type": "pause"}))["type"] == "paused"
        reply = await send(ws, {"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(16000))})
        assert (reply["code"], reply["error"]) == ("paused", "Worker is paused")
        assert worker.health()["worker_status"] == "duplex_paused"
        assert (await send(ws, {"type": "resume"})) == {"type": "resumed"}
        assert (await send(ws, {"type": "resume"})) == {"type": "resumed"}
        assert (await send(ws, {"type": "interrupt"})) == {"type": "interrupted"}
        one = await send(
            ws, {"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(16000)), "force_listen": 1}
        )
        assert one["units"] == 1 and one["current_time"] == 4 and one["is_listen"] is True
        assert (await send(ws, {"type": "stop"})) == {"type": "stopped"}
        assert await expect_close(ws) == 1000


async def test_session_streams_the_warmup_mp4_and_frees_memory(worker):
    before = worker.health()
    clip = load_media(REPO_ROOT / "assets" / "warmup.mp4", require_video=True)
    async with connect(worker.ws_url("e2e_mp4"), max_size=None) as ws:
        # CPU budget: the last 2 units decide freely (and may speak), with short speaking units.
        config = {"decode_mode": "greedy", "force_listen_count": 8, "max_new_speak_tokens_per_chunk": 4}
        prepared = await send(ws, {"type": "prepare", "config": config})
        assert prepared["type"] == "prepared" and prepared["session_id"] == "e2e_mp4"
        for second, samples in enumerate(clip.audio_chunks):  # free-running, like the browser
            frame = base64.b64encode(clip.frames[second]).decode("ascii")
            await ws.send(
                json.dumps(
                    {"type": "audio_chunk", "audio_base64": b64_pcm(samples), "frame_base64_list": [frame]}
                )
            )
        results = [json.loads(await ws.recv()) for _ in clip.audio_chunks]
        health_busy = worker.health()
        await ws.send(json.dumps({"type": "stop"}))
        assert json.loads(await ws.recv()) == {"type": "stopped"}
        assert await expect_close(ws) == 1000
    assert [r["type"] for r in results] == ["result"] * 10
    assert [r["current_time"] for r in results] == list(range(1, 11))
    assert all(r["units"] == 1 and r["vision_slices"] == 1 and r["vision_tokens"] == 64 for r in results)
    assert all(r["cost_prefill_ms"] > 0 and r["wall_clock_ms"] > 0 for r in results)
    kv = [r["kv_cache_length"] for r in results]
    assert kv == sorted(kv) and kv[0] > prepared["prompt_tokens"]
    assert health_busy["worker_status"] == "duplex_active" and health_busy["state"] == "busy"
    assert health_busy["current_session_id"] == "e2e_mp4" and health_busy["kv_cache_length"] > 0

    deadline = time.monotonic() + 10
    while (health := worker.health())["worker_status"] != "idle" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert health["worker_status"] == "idle" and health["current_session_id"] is None
    assert health["last_cleanup"]["session_id"] == "e2e_mp4"
    assert health["live_sessions"] == 0 and health["last_cleanup"]["live_sessions_after"] == 0
    assert health["total_requests"] == before["total_requests"] + 1
    assert health["avg_inference_time_ms"] > 0


async def test_second_connection_while_busy_gets_1013(worker):
    async with connect(worker.ws_url("holder"), max_size=None) as holder:
        assert (await send(holder, {"type": "prepare"}))["type"] == "prepared"
        started = time.monotonic()
        message, code = await refusal_message(worker.ws_url("second"))
        waited = time.monotonic() - started
        assert code == 1013 and message["code"] == "worker_busy" and message["fatal"] is True
        assert 4.5 <= waited < 8.0
        assert (await send(holder, {"type": "stop"}))["type"] == "stopped"


async def test_pause_timeout_then_idle_timeout(worker):
    async with connect(worker.ws_url("pauser"), max_size=None) as ws:
        assert (await send(ws, {"type": "prepare"}))["type"] == "prepared"
        assert (await send(ws, {"type": "pause", "timeout": 0.1}))["timeout"] == 1.0  # clamped to 1 s
        timeout = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        assert timeout == {"type": "timeout", "reason": "Pause timeout (1s)", "code": "pause_timeout"}
        assert await expect_close(ws) == 1000
    async with connect(worker.ws_url("idler"), max_size=None) as ws:
        assert (await send(ws, {"type": "prepare"}))["type"] == "prepared"
        started = time.monotonic()
        timeout = json.loads(await asyncio.wait_for(ws.recv(), timeout=IDLE_TIMEOUT_S + 10))
        assert timeout["code"] == "idle_timeout" and time.monotonic() - started >= IDLE_TIMEOUT_S - 0.5
        assert await expect_close(ws) == 1000


async def test_context_full_ends_the_session(worker):
    frame = base64.b64encode(load_media(REPO_ROOT / "assets" / "warmup.mp4").frames[0]).decode("ascii")
    chunk = {"type": "audio_chunk", "audio_base64": b64_pcm(np.zeros(16000)), "frame_base64_list": [frame]}
    async with connect(worker.ws_url("e2e_full"), max_size=None) as ws:
        config = {"max_kv_tokens": 256, "force_listen_count": 1000}
        assert (await send(ws, {"type": "prepare", "config": config}))["type"] == "prepared"
        for _ in range(6):
            await ws.send(json.dumps(chunk))
        messages = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=60)))
    assert closed.value.rcvd.code == 1000
    assert messages[-1] == {"type": "timeout", "reason": "Context is full", "code": "context_full"}
    results = messages[:-1]
    assert 1 <= len(results) < 6 and all(r["type"] == "result" for r in results)
    assert all(r["kv_cache_length"] <= 256 for r in results)
