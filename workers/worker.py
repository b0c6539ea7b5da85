"""Worker process: one per GPU (or one CPU worker). `python -m workers.worker --gpu-id 0 --port 22400`.

The HTTP server listens at once; the start phases run on the single model thread behind it:

    loading   build the engine (model, tokenizer, token2wav; checkpoint or random weights)
    compiling torch.compile the backbones and run one pass over the warm-up MP4 (compiles kernels,
              or loads them from torch_compile_cache/)
    warming   a second pass over the MP4 with compiled code (steady-state timings)
    idle      sessions are admitted on the internal WebSocket `/ws/duplex`

`GET /health` reports the phase, its progress and timings, the compile-cache verdict, model info and
the sessions; a failed start reports `error` with the reason. `GET /metrics` serves Prometheus text.
After a session ends, its memory (KV slot, TTS and vocoder state) is freed before the worker reports
`idle` again.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import re
import resource
import sys
import time
import traceback
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, WebSocket

from common.config import (
    REPO_ROOT,
    ServiceConfig,
    add_config_arguments,
    load_config_or_report,
)
from common.worker_secret import worker_secret_ok
from workers import compile as compile_tools
from workers.duplex_socket import DuplexSocketSession
from workers.media import load_media
from workers.metrics import WorkerMetrics
from workers.protocol import decode_wav, error_frame

log = logging.getLogger("workers.worker")

DEFAULT_VOICE_WAV = REPO_ROOT / "assets" / "default_voice.wav"
BUSY_WAIT_S = 5.0
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
_SESSION_ID_DROP = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class Progress:
    """Progress within the current start phase."""

    phase: str
    total: int = 1
    step: int = 0
    message: str = ""
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        fraction = min(self.step / self.total, 1.0) if self.total else 1.0
        eta = None  # unknown until the first step is done
        if fraction >= 1.0:
            eta = 0.0
        elif self.step > 0:
            eta = round(elapsed / self.step * (self.total - self.step), 3)
        return {
            "phase": self.phase,
            "step": self.step,
            "total": self.total,
            "fraction": round(fraction, 4),
            "elapsed_s": round(elapsed, 3),
            "eta_s": eta,
            "message": self.message,
        }


@dataclass
class SessionInfo:
    """One admitted session as /health shows it."""

    session_id: str
    kind: str
    state: str = "duplex_active"
    kv_cache_length: int = 0


def sanitize_session_id(raw: str) -> str:
    """`[A-Za-z0-9_-]`, at most 128 characters (PROTOCOL.md §1.1); a fresh id when nothing is left."""
    cleaned = _SESSION_ID_DROP.sub("", raw)[:128]
    return cleaned or f"s_{uuid.uuid4().hex[:12]}"


def resolve_device(cfg: ServiceConfig, gpu_id: int) -> str:
    """`model.device`; `auto` is cuda:<gpu_id> when CUDA is available, else cpu."""
    import torch

    if cfg.model.device != "auto":
        return cfg.model.device
    return f"cuda:{gpu_id}" if torch.cuda.is_available() else "cpu"


class Worker:
    """State, start phases and session admission of one worker process."""

    def __init__(self, cfg: ServiceConfig, gpu_id: int = 0, worker_index: int = 0, port: int = 0) -> None:
        self.cfg = cfg
        self.gpu_id = gpu_id
        self.worker_index = worker_index
        self.port = port
        self.state = "loading"
        self.error: str | None = None
        self.progress = Progress("loading", message="starting")
        self.phase_times_s: dict[str, float] = {}
        self.compile_cache: dict[str, Any] = {"verdict": "off", "hits": 0, "misses": 0}
        self.compiled_modules: list[str] = []
        self.cold_compile_s: float | None = None
        self.warmup: dict[str, Any] = {}
        self.engine: Any = None
        self.default_voice: np.ndarray | None = None
        self.metrics = WorkerMetrics()
        self.sessions: dict[str, SessionInfo] = {}
        self.live_sessions: weakref.WeakSet[Any] = weakref.WeakSet()
        self.total_requests = 0
        self.units_run = 0
        self.unit_ms_total = 0.0
        self.last_cleanup: dict[str, Any] | None = None
        self._cleaning = 0
        self._recompiles_at_ready = 0
        self._slots: asyncio.Semaphore | None = None
        self.cache_dir = compile_tools.configure_compile_cache(cfg.compile.cache_dir)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.metrics.set_state("loading")

    # -- start phases (model thread) -----------------------------------------------------------

    def _enter_phase(self, state: str, total: int, message: str) -> None:
        log.info("phase %s: %s", state, message)
        self.state = state
        self.progress = Progress(state, total=total, message=message)
        self.metrics.set_state(state)

    def _advance(self, step: int, total: int, message: str) -> None:
        self.progress.step, self.progress.total, self.progress.message = step, total, message

    def start_blocking(self) -> None:
        """loading -> compiling -> warming -> idle; on failure `error` with the reason."""
        try:
            self._load()
            if self.compile_enabled or self.cfg.service.warmup:
                clip = load_media(compile_tools.WARMUP_MP4, max_seconds=self.cfg.service.warmup_seconds)
            if self.compile_enabled:
                self._compile(clip)
            if self.cfg.service.warmup:
                self._warm(clip)
            # Compiles after this point mean the warm-up missed a shape: /health reports them.
            self._recompiles_at_ready = self.engine.recompiles_since_warmup()
            self.progress = Progress("ready", total=1, step=1, message="ready for sessions")
            self.state = "idle"
            self.metrics.set_state("idle")
            log.info("worker %d ready on port %d: %s", self.worker_index, self.port, self._start_summary())
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self.state = "error"
            self.progress.message = self.error
            self.metrics.set_state("error")
            log.error(
                "worker start failed in phase %s: %s\n%s",
                self.progress.phase,
                self.error,
                traceback.format_exc(),
            )

    @property
    def compile_enabled(self) -> bool:
        """Compile unless `service.compile` is off or the acceleration mode is eager."""
        return self.cfg.service.compile and self.cfg.model.acceleration != "eager"

    def _load(self) -> None:
        from workers.engine.engine import DuplexEngine

        self._enter_phase("loading", 1, f"building the {self.cfg.model.preset} model")
        started = time.perf_counter()
        self.engine = DuplexEngine(self.cfg, device=resolve_device(self.cfg, self.gpu_id))
        self.default_voice = self._load_default_voice()
        self._finish_phase("loading", "load", started)

    def _load_default_voice(self) -> np.ndarray | None:
        """assets/default_voice.wav unless `model.default_voice_path` is set (the engine loads that one)."""
        if self.cfg.model.default_voice_path:
            return None
        path = DEFAULT_VOICE_WAV
        if not path.is_file():
            log.warning("no default voice at %s; sessions without a reference voice get none", path)
            return None
        return decode_wav(path.read_bytes())

    def _compile(self, clip: Any) -> None:
        self._enter_phase(
            "compiling",
            compile_tools.units_in(clip, self.engine),
            "torch.compile + first pass over the warm-up MP4",
        )
        started = time.perf_counter()
        before = compile_tools.compile_cache_counters()
        self.compiled_modules = compile_tools.apply_torch_compile(self.engine, self.cfg.compile)
        self._advance(0, self.progress.total, f"{self.engine.acceleration} decoder shapes and graphs")
        # after torch.compile: every decoder shape and, with CUDA graphs, the step heads, token2wav, vision
        # and audio graphs (no-op when eager)
        self.engine.warmup()
        report = compile_tools.warmup_compile(self.engine, clip, progress=self._advance)
        self.compile_cache = compile_tools.cache_verdict(before, compile_tools.compile_cache_counters())
        self.metrics.record_compile_cache(self.compile_cache["hits"], self.compile_cache["misses"])
        self.warmup["compile_pass"] = report.as_dict()
        record = compile_tools.read_precompile_record(self.cache_dir)
        self.cold_compile_s = record.get("cold_compile_s") if record else None
        elapsed = self._finish_phase("compiling", "compile", started)
        log.info(
            "%s; %s", compile_tools.describe_cache(self.compile_cache, elapsed), self._cold_compile_note()
        )

    def _cold_compile_note(self) -> str:
        if self.cold_compile_s is None:
            return "no precompile record of a cold compile in this cache"
        return f"a cold compile took {self.cold_compile_s:.1f} s (precompile.py)"

    def _warm(self, clip: Any) -> None:
        self._enter_phase("warming", compile_tools.units_in(clip, self.engine), "warm-up session on the MP4")
        started = time.perf_counter()
        report = compile_tools.warmup_compile(self.engine, clip, progress=self._advance)
        self.warmup["warm_pass"] = report.as_dict()
        self._free_memory()
        self._finish_phase("warming", "warmup", started)

    def _finish_phase(self, state: str, metric_phase: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self.phase_times_s[state] = round(elapsed, 3)
        self.metrics.observe_start_phase(metric_phase, elapsed)
        log.info("phase %s took %.2f s", state, elapsed)
        return elapsed

    def _start_summary(self) -> str:
        times = ", ".join(f"{k} {v:.1f}s" for k, v in self.phase_times_s.items())
        return f"{times}; compile cache {self.compile_cache['verdict']}; {self.engine.info}"

    # -- sessions ------------------------------------------------------------------------------

    def _free_memory(self) -> None:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def worker_status(self) -> str:
        if self.state != "idle":
            return self.state
        if self._cleaning:
            return "cleaning_up"
        states = [s.state for s in self.sessions.values()]
        if not states:
            return "idle"
        return "duplex_paused" if all(s == "duplex_paused" for s in states) else "duplex_active"

    # SessionObserver (called on the event loop)
    def on_session_state(self, session_id: str, state: str, kv_cache_length: int) -> None:
        info = self.sessions.get(session_id)
        if info is not None:
            info.state, info.kv_cache_length = state, kv_cache_length
        self.metrics.set_state(self.worker_status)

    def on_unit(self, unit: Any, wall_ms: float) -> None:
        self.units_run += 1
        self.unit_ms_total += wall_ms
        self.metrics.observe_unit(unit.is_listen, unit.timings_ms)

    def on_finalize(self, seconds: float) -> None:
        self.metrics.observe_finalize(seconds)

    def on_error_frame(self, code: str) -> None:
        self.metrics.error(code)

    async def _refuse(self, websocket: WebSocket, code: str, message: str) -> None:
        self.metrics.error(code)
        await websocket.send_json(error_frame(code, message, fatal=True))
        await websocket.close(CLOSE_TRY_AGAIN_LATER)

    async def serve_session(self, websocket: WebSocket, raw_session_id: str, kind: str) -> None:
        """Admit (or refuse with 1013) and run one session; free its memory afterwards."""
        await websocket.accept()
        if not worker_secret_ok(websocket.headers, self.cfg.auth.worker_secret):
            await websocket.close(CLOSE_POLICY_VIOLATION, reason="unauthorized")
            return
        if self.state != "idle":
            await self._refuse(websocket, "not_ready", f"Worker is not ready ({self.state})")
            return
        assert self._slots is not None
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=BUSY_WAIT_S)
        except asyncio.TimeoutError:
            await self._refuse(websocket, "worker_busy", "Worker is busy")
            return
        runner = await self._open_session(websocket, sanitize_session_id(raw_session_id), kind)
        if runner is None:
            return
        try:
            reason = await runner.run()
            log.info("session %s ended: %s", runner.session_id, reason)
        finally:
            await self._release_session(runner)

    async def _open_session(
        self, websocket: WebSocket, session_id: str, kind: str
    ) -> DuplexSocketSession | None:
        """Create the engine session on the slot just taken; on failure refuse (1011) and free the slot."""
        assert self._slots is not None
        self._cleaning += 1  # until the session exists, /health must not offer this slot as idle
        try:
            session = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.engine.new_session, session_id
            )
        except Exception as e:
            log.exception("session %s: could not be created", session_id)
            self._slots.release()
            await websocket.send_json(
                error_frame("internal_error", f"Session could not start: {e}", fatal=True)
            )
            await websocket.close(CLOSE_INTERNAL_ERROR)
            return None
        finally:
            self._cleaning -= 1
        self.live_sessions.add(session)
        self.sessions[session_id] = SessionInfo(session_id, kind)
        self.total_requests += 1
        self.metrics.session_started()
        self.metrics.set_state(self.worker_status)
        return DuplexSocketSession(
            websocket, session_id, session, self.cfg, self.executor, self, default_voice=self.default_voice
        )

    async def _release_session(self, runner: DuplexSocketSession) -> None:
        """Free the session's KV slot, TTS and vocoder state, then report the slot idle again."""
        loop = asyncio.get_running_loop()
        self._cleaning += 1
        self.sessions.pop(runner.session_id, None)
        self.metrics.set_state(self.worker_status)
        started = time.perf_counter()
        session = runner.detach_session()
        try:
            await loop.run_in_executor(self.executor, session.close)
            del session  # the last strong reference: gc and empty_cache below free what it held
            await loop.run_in_executor(self.executor, self._free_memory)
        finally:
            self.last_cleanup = {
                "session_id": runner.session_id,
                "freed_ms": round((time.perf_counter() - started) * 1000.0, 3),
                "live_sessions_after": len(self.live_sessions),
            }
            self._cleaning -= 1
            assert self._slots is not None
            self._slots.release()
            self.metrics.set_state(self.worker_status)

    # -- health --------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The worker's /health document (PROTOCOL.md §3 plus extras)."""
        status = {"idle": "healthy", "error": "error"}.get(self.state, "initializing")
        info = dict(self.engine.info) if self.engine is not None else {}
        current = next(iter(self.sessions.values()), None)
        return {
            "status": status,
            "worker_status": self.worker_status,
            "state": "busy" if self.state == "idle" and (self.sessions or self._cleaning) else self.state,
            "model_loaded": self.engine is not None,
            "progress": self.progress.as_dict(),
            "error": self.error,
            "gpu_id": self.gpu_id,
            "worker_index": self.worker_index,
            "port": self.port,
            "preset": info.get("preset", self.cfg.model.preset),
            "weights": info.get("weights"),
            "device": info.get("device"),
            "dtype": info.get("dtype"),
            "acceleration": self.cfg.model.acceleration,
            "engine": info,
            "compiled": bool(self.compiled_modules) or info.get("acceleration", "eager") != "eager",
            "compile": {
                "enabled": self.compile_enabled,
                "mode": self.cfg.compile.mode,
                "modules": self.compiled_modules,
                "cache": self.compile_cache,
                "cold_compile_s": self.cold_compile_s,
            },
            "phase_times_s": self.phase_times_s,
            "recompiles_since_ready": (
                self.engine.recompiles_since_warmup() - self._recompiles_at_ready
                if self.state == "idle"
                else None
            ),
            "warmup": {
                name: {k: report[k] for k in ("total_s", "speak_units", "tokens")}
                for name, report in self.warmup.items()
            },
            "current_session_id": current.session_id if current else None,
            "sessions": [asdict(s) for s in self.sessions.values()],
            "slots": self.cfg.service.sessions_per_worker,
            "live_sessions": len(self.live_sessions),
            "last_cleanup": self.last_cleanup,
            "total_requests": self.total_requests,
            "avg_inference_time_ms": round(self.unit_ms_total / self.units_run, 3) if self.units_run else 0.0,
            "kv_cache_length": current.kv_cache_length if current else 0,
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        }

    # -- app -----------------------------------------------------------------------------------

    def build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI):
            self._slots = asyncio.Semaphore(self.cfg.service.sessions_per_worker)
            start = asyncio.get_running_loop().run_in_executor(self.executor, self.start_blocking)
            yield
            await asyncio.wait([start], timeout=1.0)
            self.executor.shutdown(wait=False, cancel_futures=True)

        app = FastAPI(title="omni duplex worker", lifespan=lifespan)
        app.include_router(self.metrics.router())

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return self.health()

        @app.websocket("/ws/duplex")
        async def duplex(websocket: WebSocket, session_id: str = "", kind: str = "omni_duplex") -> None:
            await self.serve_session(websocket, session_id, kind)

        return app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-id", type=int, default=0)
    parser.add_argument("--worker-index", type=int, default=0)
    parser.add_argument(
        "--port", type=int, default=None, help="default: service.worker_base_port + worker index"
    )
    parser.add_argument("--host", default=None, help="default: service.host")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config_or_report(args.config, args.overrides, "worker")
    if cfg is None:
        return 2
    port = args.port if args.port is not None else cfg.service.worker_base_port + args.worker_index
    worker = Worker(cfg, gpu_id=args.gpu_id, worker_index=args.worker_index, port=port)
    uvicorn.run(
        worker.build_app(),
        host=args.host or cfg.service.host,
        port=port,
        ws_max_size=cfg.service.limits.max_message_bytes,
        log_level="warning",
    )
    return 1 if worker.state == "error" else 0


if __name__ == "__main__":
    sys.exit(main())
