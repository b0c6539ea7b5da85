"""The gateway's HTTP endpoints: health (open), and status, workers, queue, default reference voice
(`protected_router`: the app adds the API-key dependency)."""

from __future__ import annotations

import base64
import functools
import time
from pathlib import Path
from typing import Any

import ffmpeg
from fastapi import APIRouter, HTTPException, Request

from common.config import REPO_ROOT
from server.state import GatewayState

open_router = APIRouter()
protected_router = APIRouter()

REF_AUDIO_SAMPLE_RATE = 16000
DEFAULT_VOICE_ASSET = REPO_ROOT / "assets" / "default_voice.wav"


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway


@open_router.get("/health")
async def health() -> dict[str, Any]:
    return {"status": "healthy", "timestamp": time.time()}


@protected_router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    pool = _state(request).pool
    by_state: dict[str, int] = {}
    for worker in pool.workers:
        by_state[worker.state] = by_state.get(worker.state, 0) + 1
    return {
        "gateway_healthy": True,
        "total_workers": len(pool.workers),
        "idle_workers": by_state.get("idle", 0),
        "busy_workers": by_state.get("busy", 0) + by_state.get("releasing", 0),
        "workers_by_state": by_state,
        "queue_length": len(pool.queue),
        "max_queue_size": pool.queue.max_size,
        "running_sessions": pool.running_sessions(),
    }


@protected_router.get("/workers")
async def workers(request: Request) -> dict[str, Any]:
    pool = _state(request).pool
    return {"total": len(pool.workers), "workers": [w.describe() for w in pool.workers]}


@protected_router.get("/api/queue")
async def queue(request: Request) -> dict[str, Any]:
    pool = _state(request).pool
    now = time.monotonic()
    return {
        "queue_length": len(pool.queue),
        "max_queue_size": pool.queue.max_size,
        "expected_session_s": pool.durations.snapshot(),
        "tickets": [
            {
                "ticket_id": t.ticket_id,
                "session_id": t.session_id,
                "kind": t.kind,
                "waited_s": round(now - t.enqueued_at, 1),
                **pool.queue_view(t),
            }
            for t in pool.queue.tickets()
        ],
    }


@protected_router.get("/api/default_ref_audio")
async def default_ref_audio(request: Request) -> dict[str, Any]:
    """The default voice as the reference serves it: raw float32 LE PCM, 16 kHz mono, base64."""
    configured = _state(request).config.model.default_voice_path
    path = Path(configured) if configured else DEFAULT_VOICE_ASSET
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.is_file():
        raise HTTPException(status_code=404, detail="No default reference audio")
    return _encode_ref_audio(str(path))


@functools.lru_cache(maxsize=4)
def _encode_ref_audio(path: str) -> dict[str, Any]:
    try:
        pcm, _ = (
            ffmpeg.input(path)
            .output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=REF_AUDIO_SAMPLE_RATE)
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as exc:
        raise HTTPException(status_code=500, detail=f"cannot decode {Path(path).name}") from exc
    samples = len(pcm) // 4
    return {
        "name": Path(path).name,
        "duration": round(samples / REF_AUDIO_SAMPLE_RATE, 1),
        "sample_rate": REF_AUDIO_SAMPLE_RATE,
        "samples": samples,
        "base64": base64.b64encode(pcm).decode("ascii"),
    }
