"""Media files -> model inputs with ffmpeg-python: 1 s chunks of 16 kHz mono float32 + one JPEG per second.

Used by the warm-up (assets/warmup.mp4), benchmarks and clients that replay a file. Every failure
raises `MediaError` with a message that names the problem (ffmpeg missing, unreadable file, no
audio stream, no video stream where one is required).
"""

from __future__ import annotations

import io
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import ffmpeg
import numpy as np
from PIL import Image

SAMPLE_RATE = 16_000
CHUNK_SAMPLES = SAMPLE_RATE  # 1 s units
JPEG_QUALITY = 70  # what the browser client sends (canvas.toBlob quality 0.7)


class MediaError(RuntimeError):
    """A media file cannot be turned into chunks; the message says why."""


@dataclass
class MediaClip:
    """A decoded clip: `audio_chunks[i]` and `frames[i]` (if any) belong to second i."""

    path: Path
    audio_chunks: list[np.ndarray]
    frames: list[bytes] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def has_video(self) -> bool:
        return bool(self.frames)

    def frame_images(self, index: int) -> list[Image.Image]:
        """The frame of second `index` as a one-element list of RGB images (empty past the video's end)."""
        if index >= len(self.frames):
            return []
        return [Image.open(io.BytesIO(self.frames[index])).convert("RGB")]


def _require_ffmpeg() -> None:
    if shutil.which("ffmpeg") is None:
        raise MediaError("ffmpeg is not installed or not on PATH; install ffmpeg to decode media files")


def _ffmpeg_message(err: ffmpeg.Error) -> str:
    lines = (err.stderr or b"").decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "ffmpeg failed"


def _no_such_stream(err: ffmpeg.Error) -> bool:
    """ffmpeg's answer when a stream specifier (e.g. the file's first audio stream) matches nothing."""
    return b"matches no streams" in (err.stderr or b"")


def _container_duration(path: Path) -> float | None:
    """The container's duration from ffprobe, None where only ffmpeg is installed (imageio-ffmpeg)."""
    if shutil.which("ffprobe") is None:
        return None
    try:
        duration = ffmpeg.probe(str(path)).get("format", {}).get("duration")
    except ffmpeg.Error as e:
        raise MediaError(f"cannot read media file {path}: {_ffmpeg_message(e)}") from e
    return float(duration) if duration else None


def _decode_audio(path: Path, max_seconds: float | None) -> np.ndarray:
    """The first audio stream as 16 kHz mono float32."""
    output_args = {"format": "f32le", "acodec": "pcm_f32le", "ac": 1, "ar": SAMPLE_RATE}
    if max_seconds is not None:
        output_args["t"] = max_seconds
    try:
        raw, _ = (
            ffmpeg.input(str(path))["a:0"]
            .output("pipe:", **output_args)
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as e:
        if _no_such_stream(e):
            raise MediaError(f"{path} has no audio stream; the duplex model needs speech audio") from e
        raise MediaError(f"cannot read media file {path}: {_ffmpeg_message(e)}") from e
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _decode_frames(path: Path, max_seconds: float | None) -> list[bytes]:
    """One frame per second of the first video stream (cover art excluded) as JPEG bytes; [] if none.

    ffmpeg's fps filter picks the frame nearest each second; frames come out as a PPM stream, whose
    headers carry the size, so no separate probe is needed.
    """
    output_args = {"format": "image2pipe", "vcodec": "ppm"}
    if max_seconds is not None:
        output_args["t"] = max_seconds
    try:
        raw, _ = (
            ffmpeg.input(str(path))["V:0"]
            .filter("fps", fps=1)
            .output("pipe:", **output_args)
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as e:
        if _no_such_stream(e):
            return []
        raise MediaError(f"cannot decode the video of {path}: {_ffmpeg_message(e)}") from e
    if not raw:
        return []
    first = Image.open(io.BytesIO(raw))  # every frame has the first one's size and header length
    header = first.tile[0][2]
    stride = header + first.width * first.height * 3
    frames = []
    for start in range(0, len(raw) - stride + 1, stride):
        pixels = raw[start + header : start + stride]
        buffer = io.BytesIO()
        Image.frombytes("RGB", first.size, pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        frames.append(buffer.getvalue())
    return frames


def load_media(path: str | Path, require_video: bool = False, max_seconds: float | None = None) -> MediaClip:
    """Decode an MP4 (audio + video) or an audio-only file (WAV, ...) into 1 s units.

    Audio is resampled to 16 kHz mono float32 and cut into 16 000-sample chunks (the last may be
    shorter). Video, if present, gives one JPEG per second. Raises MediaError for a missing ffmpeg,
    an unreadable file, a file without audio, or a file without video when `require_video`.
    """
    path = Path(path)
    _require_ffmpeg()
    if not path.is_file():
        raise MediaError(f"media file not found: {path}")
    samples = _decode_audio(path, max_seconds)
    container_s = _container_duration(path)
    if container_s:  # AAC decoders emit encoder-delay padding past the container's duration
        samples = samples[: round(container_s * SAMPLE_RATE)]
    if samples.size == 0:
        raise MediaError(f"{path}: the audio stream decoded to zero samples")
    chunks = [samples[i : i + CHUNK_SAMPLES] for i in range(0, samples.size, CHUNK_SAMPLES)]
    frames = _decode_frames(path, max_seconds)
    if require_video and not frames:
        raise MediaError(f"{path} has no video stream, but video frames are required")
    frames = frames[: math.ceil(samples.size / CHUNK_SAMPLES)]  # frames past the audio have no unit
    return MediaClip(path=path, audio_chunks=chunks, frames=frames, duration_s=samples.size / SAMPLE_RATE)
