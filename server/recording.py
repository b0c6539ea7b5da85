"""Optional per-session recording (config `recording`, off by default), written by the gateway.

The recorder sees the internal protocol: the messages the gateway sends to a worker (legacy
`audio_chunk`, also for realtime v2 sessions after translation) and the worker's replies. Each
session gets a directory `<recording.dir>/<UTC start>_<session id>/` holding

    input.wav       the audio sent to the worker, 16 kHz mono 16-bit
    frames/         camera frames as sent, `<chunk index>_<n>.jpg` (not re-encoded)
    output.wav      the returned audio of every `result`, in order, 24 kHz mono 16-bit
    timeline.jsonl  one line per `result`: its fields minus `audio_data`, plus `result_index` and
                    `t_s` (seconds since the session got its worker)
    session.json    who and when; rewritten at the end with the end reason and counts

Only the newest `recording.retention_sessions` directories are kept: opening a session deletes the
oldest finished ones beyond that (a session still recording is never deleted). Undecodable audio or
frames are skipped (the worker reports them to the client); a write that fails (a full disk) stops that
session's recording, never the session.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import shutil
import time
import wave
from collections.abc import Callable
from datetime import datetime, timezone
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from common.config import REPO_ROOT, RecordingConfig

log = logging.getLogger("gateway.recording")

INPUT_SAMPLE_RATE = 16000
OUTPUT_SAMPLE_RATE = 24000


def decode_base64(text: Any) -> bytes | None:
    """Lenient base64 like the worker's (optional `data:...;base64,` prefix, URL-safe alphabet,
    missing padding); None when it is not base64 at all."""
    if not isinstance(text, str):
        return None
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    payload = payload.strip().replace("-", "+").replace("_", "/")
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None


def pcm16(samples_f32le: bytes) -> bytes:
    """Raw float32 LE PCM -> 16-bit PCM bytes (a trailing partial sample is dropped)."""
    samples = np.frombuffer(samples_f32le[: len(samples_f32le) // 4 * 4], dtype="<f4")
    samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def _open_wav(path: Path, sample_rate: int) -> wave.Wave_write:
    writer = wave.open(str(path), "wb")
    writer.setnchannels(1)
    writer.setsampwidth(2)
    writer.setframerate(sample_rate)
    return writer


Method = TypeVar("Method", bound=Callable[..., None])


def _recording_step(method: Method) -> Method:
    """Run a recorder method unless the recording already failed; a failed write ends the recording."""

    @wraps(method)
    def step(self: SessionRecorder, *args: Any) -> None:
        if self.failed:
            return
        try:
            method(self, *args)
        except (OSError, ValueError):  # ValueError: a write to a file a failed step left closed
            self.failed = True
            log.exception("recording of %s stopped", self.directory.name)

    return step  # type: ignore[return-value]


class SessionRecorder:
    """Writes one session's directory. Every method is cheap and never raises: not on bad content, and
    not when the disk fails (the recording stops, `failed` says so)."""

    def __init__(self, directory: Path, meta: dict[str, Any],
                 on_close: Callable[[Path], None] | None = None) -> None:
        self.directory = directory
        self.failed = False
        self._on_close = on_close
        self.frames_dir = directory / "frames"
        self.frames_dir.mkdir(parents=True)
        self.meta = meta
        self.started = time.monotonic()
        self.chunks = 0
        self.frames = 0
        self.results = 0
        self.input_samples = 0
        self.output_samples = 0
        self._input = _open_wav(directory / "input.wav", INPUT_SAMPLE_RATE)
        self._output = _open_wav(directory / "output.wav", OUTPUT_SAMPLE_RATE)
        self._timeline = (directory / "timeline.jsonl").open("w", encoding="utf-8")
        self._write_meta()

    @_recording_step
    def to_worker(self, message: dict[str, Any] | None) -> None:
        """A message the gateway sent to the worker; `audio_chunk`s are recorded."""
        if not message or message.get("type") != "audio_chunk":
            return
        chunk_index = self.chunks
        self.chunks += 1
        audio = decode_base64(message.get("audio_base64") or message.get("audio"))
        if audio:
            pcm = pcm16(audio)
            self._input.writeframes(pcm)
            self.input_samples += len(pcm) // 2
        frames = message.get("frame_base64_list")
        for n, frame in enumerate(frames if isinstance(frames, list) else []):
            jpeg = decode_base64(frame)
            if jpeg:
                (self.frames_dir / f"{chunk_index:06d}_{n}.jpg").write_bytes(jpeg)
                self.frames += 1

    @_recording_step
    def from_worker(self, message: dict[str, Any] | None) -> None:
        """A message the worker sent; each `result` adds its audio and a timeline line."""
        if not message or message.get("type") != "result":
            return
        audio = decode_base64(message.get("audio_data")) if message.get("audio_data") else None
        if audio:
            pcm = pcm16(audio)
            self._output.writeframes(pcm)
            self.output_samples += len(pcm) // 2
        line = {key: value for key, value in message.items() if key != "audio_data"}
        line.update(result_index=self.results, t_s=round(time.monotonic() - self.started, 3))
        self.results += 1
        self._timeline.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._timeline.flush()

    def close(self, reason: str) -> None:
        """Finish the files; `reason` says how the session ended."""
        self._finish(reason)
        if self._on_close is not None:
            self._on_close(self.directory)

    @_recording_step
    def _finish(self, reason: str) -> None:
        self._input.close()
        self._output.close()
        self._timeline.close()
        self.meta.update(
            end_reason=reason,
            duration_s=round(time.monotonic() - self.started, 3),
            chunks=self.chunks,
            frames=self.frames,
            results=self.results,
            input_s=round(self.input_samples / INPUT_SAMPLE_RATE, 3),
            output_s=round(self.output_samples / OUTPUT_SAMPLE_RATE, 3),
        )
        self._write_meta()

    def _write_meta(self) -> None:
        (self.directory / "session.json").write_text(json.dumps(self.meta, indent=2) + "\n")


class RecordingStore:
    """Creates session recorders under `recording.dir` and enforces the retention limit."""

    def __init__(self, config: RecordingConfig, base_dir: Path = REPO_ROOT) -> None:
        self.enabled = config.enabled
        root = Path(config.dir)
        self.root = root if root.is_absolute() else base_dir / root
        self.retention = config.retention_sessions
        self._recording: set[Path] = set()  # directories of sessions still running

    def open(self, session_id: str, kind: str, protocol: str, worker_url: str) -> SessionRecorder | None:
        """A recorder for a session that just got its worker; None when recording is off or fails."""
        if not self.enabled:
            return None
        now = datetime.now(timezone.utc)
        directory = self.root / f"{now.strftime('%Y%m%dT%H%M%S.%f')}_{session_id}"
        meta = {"session_id": session_id, "kind": kind, "protocol": protocol, "worker": worker_url,
                "started_at": now.isoformat()}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._prune(keep=self.retention - 1)
            recorder = SessionRecorder(directory, meta, on_close=self._recording.discard)
        except OSError:
            log.exception("session %s: cannot record to %s", session_id, directory)
            return None
        self._recording.add(directory)
        return recorder

    def sessions(self) -> list[Path]:
        """Recorded session directories, oldest first (names start with the UTC start time)."""
        if not self.root.is_dir():
            return []
        return sorted(path for path in self.root.iterdir() if path.is_dir())

    def _prune(self, keep: int) -> None:
        """Delete the oldest finished recordings until at most `keep` directories remain (or only live ones)."""
        sessions = self.sessions()
        excess = len(sessions) - keep
        for old in (path for path in sessions if path not in self._recording):
            if excess <= 0:
                break
            shutil.rmtree(old, ignore_errors=True)
            excess -= 1
