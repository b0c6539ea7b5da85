"""Parse and validate legacy duplex client messages; build `result` dicts (PROTOCOL.md §1 and §4).

Pure functions over JSON objects, numpy arrays and PIL images: no torch and no sockets, so every
bad-input case of PROTOCOL.md §4 is testable without a model. A rejected message raises
`ProtocolError` (code + human text); non-fatal problems with otherwise usable data come back as
`warnings` lists of `{code, message}`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from common.config import ConfigError, ServiceConfig, SessionSettings, validate_session_settings

INPUT_SAMPLE_RATE = 16_000
OUTPUT_SAMPLE_RATE = 24_000
MAX_SLICE_NUMS = 9
PAUSE_TIMEOUT_RANGE_S = (1.0, 300.0)
MIN_REF_AUDIO_S = 0.1  # the LLM voice's shortest clip (workers/model/apm.py encode_offline)
# Legacy clients that receive a listening unit get 1 s of zeros (PROTOCOL.md §1.8).
_SILENCE_1S_BASE64 = base64.b64encode(np.zeros(OUTPUT_SAMPLE_RATE, dtype="<f4").tobytes()).decode("ascii")

WarningItem = dict[str, str]


class ProtocolError(Exception):
    """A client message is rejected; `code` is the machine-readable code of PROTOCOL.md §4."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def warning(code: str, message: str) -> WarningItem:
    return {"code": code, "message": message}


def error_frame(
    code: str, message: str, fatal: bool = False, chunk_index: int | None = None
) -> dict[str, Any]:
    """An `error` frame: `error` is the text clients read; `message` repeats it next to `code`."""
    frame: dict[str, Any] = {
        "type": "error",
        "error": message,
        "code": code,
        "message": message,
        "fatal": fatal,
    }
    if chunk_index is not None:
        frame["chunk_index"] = chunk_index
    return frame


# ---------------------------------------------------------------------------------------------
# Frames and base64


def parse_text_frame(text: str) -> dict[str, Any]:
    """A text frame -> message object with a string `type` (rows 1-2)."""
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, an integer over 4300 digits
        raise ProtocolError("bad_json", f"Invalid JSON: {e}") from e
    if not isinstance(message, dict):
        raise ProtocolError("bad_message", "Message must be a JSON object")
    if not isinstance(message.get("type"), str):
        raise ProtocolError("bad_message", "Message needs a string 'type'")
    return message


def decode_base64(text: Any, code: str, what: str) -> bytes:
    """Lenient base64: standard or URL-safe alphabet, optional padding, optional `data:...;base64,` prefix."""
    if not isinstance(text, str):
        raise ProtocolError(code, f"{what} must be a base64 string")
    payload = text.strip()
    if payload.startswith("data:"):
        _, sep, payload = payload.partition(",")
        if not sep:
            raise ProtocolError(code, f"{what}: data URL without a ',' separator")
    payload = "".join(payload.split()).replace("-", "+").replace("_", "/")
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(code, f"{what} is not valid base64") from e


def decode_pcm_f32(text: Any, what: str = "audio_base64") -> np.ndarray:
    """base64 raw float32 LE PCM -> float32 samples clipped to [-1, 1] (rows 6-8)."""
    raw = decode_base64(text, "bad_base64", what)
    if len(raw) % 4:
        raise ProtocolError(
            "bad_pcm_length", f"{what}: {len(raw)} bytes is not a multiple of 4 (float32 PCM)"
        )
    samples = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(samples).all():
        raise ProtocolError("non_finite_audio", f"{what} contains NaN or Inf samples")
    return np.clip(samples, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Reference audio: raw float32 PCM or a WAV file


def _resample_linear(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear-interpolation resampling; enough for a voice reference clip."""
    if rate == target or samples.size == 0:
        return samples
    n_out = max(1, round(samples.size * target / rate))
    positions = np.arange(n_out, dtype=np.float64) * (rate / target)
    return np.interp(positions, np.arange(samples.size), samples).astype(np.float32)


def decode_wav(data: bytes, max_s: float | None = None) -> np.ndarray:
    """RIFF/WAVE (PCM 8/16/24/32-bit or float 32/64, any channel count) -> 16 kHz mono float32.

    Raises ValueError naming what is wrong with the file; with `max_s`, also when it is longer than that
    (checked before resampling, which a tiny declared rate would blow up).
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    fmt: tuple[int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise ValueError("WAV fmt chunk too short")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if (
                tag == 0xFFFE and len(body) >= 26
            ):  # WAVE_FORMAT_EXTENSIBLE: real tag opens the sub-format GUID
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise ValueError("WAV data chunk before fmt chunk")
            return _wav_samples(body, *fmt, max_s)
        pos += 8 + size + (size & 1)
    raise ValueError("WAV file without fmt/data chunks")


def _wav_samples(body: bytes, tag: int, channels: int, rate: int, bits: int, max_s: float | None) -> np.ndarray:
    if channels < 1 or rate < 1:
        raise ValueError(f"WAV header has {channels} channels at {rate} Hz")
    width = bits // 8
    body = body[: len(body) - len(body) % (width * channels)] if width else body
    if max_s is not None and width and len(body) / (width * channels) > max_s * rate:
        raise ValueError(f"{len(body) / (width * channels) / rate:.1f} s long; the limit is {max_s:g} s")
    if tag == 3 and bits in (32, 64):
        samples = np.frombuffer(body, dtype=f"<f{width}").astype(np.float64)
    elif tag == 1 and bits == 8:
        samples = (np.frombuffer(body, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif tag == 1 and bits in (16, 32):
        samples = np.frombuffer(body, dtype=f"<i{width}").astype(np.float64) / float(2 ** (bits - 1))
    elif tag == 1 and bits == 24:
        triples = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        samples = np.where(ints >= 1 << 23, ints - (1 << 24), ints).astype(np.float64) / float(1 << 23)
    else:
        raise ValueError(f"unsupported WAV sample format (format tag {tag}, {bits} bits)")
    mono = samples.reshape(-1, channels).mean(axis=1).astype(np.float32)
    return _resample_linear(mono, rate, INPUT_SAMPLE_RATE)


def decode_ref_audio(raw: bytes, max_s: float, what: str) -> np.ndarray:
    """Reference audio bytes (WAV file or raw float32 LE PCM 16 kHz) -> validated float32 (row 17)."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WAVE":
        try:
            samples = decode_wav(raw, max_s)
        except (ValueError, struct.error) as e:
            raise ProtocolError("bad_ref_audio", f"{what}: unreadable WAV ({e})") from e
    else:
        if len(raw) % 4:
            raise ProtocolError(
                "bad_ref_audio", f"{what}: {len(raw)} bytes is not a multiple of 4 (float32 PCM)"
            )
        samples = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if samples.size == 0:
        raise ProtocolError("bad_ref_audio", f"{what} is empty")
    if not np.isfinite(samples).all():
        raise ProtocolError("bad_ref_audio", f"{what} contains NaN or Inf samples")
    if samples.size > max_s * INPUT_SAMPLE_RATE:
        raise ProtocolError(
            "bad_ref_audio",
            f"{what} is {samples.size / INPUT_SAMPLE_RATE:.1f} s long; the limit is {max_s:g} s",
        )
    return np.clip(samples, -1.0, 1.0)


def _ref_audio_from_base64(text: Any, max_s: float, what: str) -> np.ndarray:
    return decode_ref_audio(decode_base64(text, "bad_ref_audio", what), max_s, what)


def _ref_audio_from_path(path_text: Any, allowed_dir: str | None, max_s: float) -> np.ndarray:
    """`ref_audio_path`: honoured only inside the configured allow-listed directory (row 19)."""
    if not isinstance(path_text, str) or not path_text:
        raise ProtocolError("ref_audio_path_forbidden", "ref_audio_path must be a non-empty string")
    if allowed_dir is None:
        raise ProtocolError("ref_audio_path_forbidden", "ref_audio_path is not enabled on this server")
    root = Path(allowed_dir).resolve()
    path = (root / path_text).resolve()
    if not path.is_relative_to(root):
        raise ProtocolError("ref_audio_path_forbidden", "ref_audio_path is outside the allowed directory")
    if not path.is_file():
        raise ProtocolError("bad_ref_audio", f"ref_audio_path {path_text!r} does not exist")
    return decode_ref_audio(path.read_bytes(), max_s, "ref_audio_path")


# ---------------------------------------------------------------------------------------------
# prepare


@dataclass
class PrepareRequest:
    """A validated `prepare` message (PROTOCOL.md §1.5)."""

    system_prompt: str
    settings: SessionSettings
    ref_audio: np.ndarray | None
    tts_ref_audio: np.ndarray | None
    max_slice_nums: int
    deferred_finalize: bool
    listen_audio: str
    warnings: list[WarningItem] = field(default_factory=list)


def _is_finite_number(value: Any) -> bool:
    """A JSON number that is finite; ints of any size count (math.isfinite cannot take the huge ones)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def clamp_max_slice_nums(value: Any, warnings: list[WarningItem]) -> int:
    """An int in 1..9; anything else is clamped (or defaults to 1) with a `max_slice_nums_clamped` warning."""
    if not _is_finite_number(value):
        warnings.append(
            warning("max_slice_nums_clamped", f"max_slice_nums {value!r:.40} is not an integer; using 1")
        )
        return 1
    clamped = min(max(int(value), 1), MAX_SLICE_NUMS)
    if clamped != value:
        warnings.append(warning("max_slice_nums_clamped", f"max_slice_nums {value!r:.40} clamped to {clamped}"))
    return clamped


def parse_prepare(message: dict[str, Any], cfg: ServiceConfig) -> PrepareRequest:
    """Validate a `prepare`: config (row 18), reference audio (rows 17, 19), slicing (row 20)."""
    warnings: list[WarningItem] = []
    system_prompt = message.get("system_prompt", cfg.duplex.system_prompt)
    if not isinstance(system_prompt, str):
        raise ProtocolError("invalid_config", "system_prompt must be a string")
    config = message.get("config") or {}
    if not isinstance(config, dict):
        raise ProtocolError("invalid_config", "config must be a JSON object")
    config = dict(config)
    for key, required in (("chunk_ms", 1000), ("sample_rate", INPUT_SAMPLE_RATE)):
        if key in config and config.pop(key) != required:
            warnings.append(warning(f"unsupported_{key}", f"config.{key} must be {required}; ignored"))
    slice_source = message.get("max_slice_nums", config.pop("max_slice_nums", None))
    max_slice_nums = 1 if slice_source is None else clamp_max_slice_nums(slice_source, warnings)
    config.setdefault("listen_audio", cfg.service.listen_audio)
    try:
        settings = validate_session_settings(cfg.duplex.session_defaults, config)
    except ConfigError as e:
        raise ProtocolError("invalid_config", str(e)) from e

    limits = cfg.service.limits
    ref_audio = None
    if message.get("ref_audio_base64"):
        ref_audio = _ref_audio_from_base64(
            message["ref_audio_base64"], limits.max_ref_audio_s, "ref_audio_base64"
        )
    elif message.get("ref_audio_path") is not None:
        ref_audio = _ref_audio_from_path(
            message["ref_audio_path"], cfg.service.ref_audio_dir, limits.max_ref_audio_s
        )
    if ref_audio is not None and ref_audio.size < MIN_REF_AUDIO_S * INPUT_SAMPLE_RATE:
        raise ProtocolError("bad_ref_audio", f"the voice reference is shorter than {MIN_REF_AUDIO_S:g} s")
    tts_ref_audio = ref_audio
    if message.get("tts_ref_audio_base64"):
        tts_ref_audio = _ref_audio_from_base64(
            message["tts_ref_audio_base64"], limits.max_ref_audio_s, "tts_ref_audio_base64"
        )
    return PrepareRequest(
        system_prompt=system_prompt,
        settings=settings,
        ref_audio=ref_audio,
        tts_ref_audio=tts_ref_audio,
        max_slice_nums=max_slice_nums,
        deferred_finalize=bool(message.get("deferred_finalize", cfg.duplex.deferred_finalize)),
        listen_audio=settings.listen_audio,
        warnings=warnings,
    )


# ---------------------------------------------------------------------------------------------
# audio_chunk


@dataclass
class AudioChunk:
    """A validated `audio_chunk` (PROTOCOL.md §1.6)."""

    samples: np.ndarray
    frames: list[Image.Image]
    force_listen: bool
    max_slice_nums: int | None
    warnings: list[WarningItem] = field(default_factory=list)


def decode_frames(items: Any, cfg: ServiceConfig, warnings: list[WarningItem]) -> list[Image.Image]:
    """`frame_base64_list` -> RGB images; bad or oversized frames are dropped with a warning (rows 12-13)."""
    if items is None:
        return []
    if not isinstance(items, list):
        warnings.append(warning("bad_frame", "frame_base64_list must be a list; frames ignored"))
        return []
    limits = cfg.service.limits
    if len(items) > limits.max_frames_per_chunk:
        warnings.append(
            warning(
                "too_many_frames",
                f"{len(items)} frames sent; the first {limits.max_frames_per_chunk} are used",
            )
        )
        items = items[: limits.max_frames_per_chunk]
    frames = []
    for index, item in enumerate(items):
        try:
            raw = decode_base64(item, "bad_frame", f"frame {index}")
        except ProtocolError as e:
            warnings.append(warning("bad_frame", e.message))
            continue
        if len(raw) > limits.max_frame_bytes:
            warnings.append(
                warning(
                    "frame_too_large", f"frame {index} is {len(raw)} bytes; limit {limits.max_frame_bytes}"
                )
            )
            continue
        try:
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > limits.max_frame_pixels:
                warnings.append(
                    warning(
                        "frame_too_large",
                        f"frame {index} is {image.width}x{image.height}; "
                        f"limit {limits.max_frame_pixels} pixels",
                    )
                )
                continue
            frames.append(image.convert("RGB"))
        except Image.DecompressionBombError:
            warnings.append(warning("frame_too_large", f"frame {index} is too large to decode"))
        except (OSError, ValueError, SyntaxError) as e:
            warnings.append(warning("bad_frame", f"frame {index} does not decode as an image ({e})"))
    return frames


def is_truthy(value: Any) -> bool:
    """`force_listen` follows Python truthiness like the reference (row 21)."""
    return bool(value)


def parse_audio_chunk(message: dict[str, Any], cfg: ServiceConfig) -> AudioChunk:
    """Validate an `audio_chunk` (rows 5-8, 11-13, 20-21). `audio_base64` wins over its alias `audio`."""
    audio = message.get("audio_base64") or message.get("audio")
    if not audio:
        raise ProtocolError("missing_audio", "Missing audio_base64")
    samples = decode_pcm_f32(audio)
    max_samples = int(cfg.service.limits.max_chunk_s * INPUT_SAMPLE_RATE)
    if samples.size > max_samples:
        raise ProtocolError(
            "chunk_too_long",
            f"chunk of {samples.size / INPUT_SAMPLE_RATE:.2f} s exceeds "
            f"{cfg.service.limits.max_chunk_s:g} s; split it",
        )
    warnings: list[WarningItem] = []
    frames = decode_frames(message.get("frame_base64_list"), cfg, warnings)
    max_slice_nums = None
    if message.get("max_slice_nums") is not None:
        max_slice_nums = clamp_max_slice_nums(message["max_slice_nums"], warnings)
    return AudioChunk(
        samples=samples,
        frames=frames,
        force_listen=is_truthy(message.get("force_listen", False)),
        max_slice_nums=max_slice_nums,
        warnings=warnings,
    )


def parse_pause_timeout(message: dict[str, Any], default_s: float) -> float:
    """`pause.timeout` in seconds, clamped to 1-300 s; a missing or non-numeric value gives the default."""
    value = message.get("timeout", default_s)
    if not _is_finite_number(value):
        value = default_s
    low, high = PAUSE_TIMEOUT_RANGE_S
    return float(min(max(value, low), high))


# ---------------------------------------------------------------------------------------------
# result


class UnitLike(Protocol):
    """The fields of the engine's `UnitResult` that a `result` frame reports."""

    is_listen: bool
    text: str
    audio: np.ndarray
    end_of_turn: bool
    n_tokens: int
    n_tts_tokens: int
    kv_cache_length: int
    vision_slices: int
    vision_tokens: int
    timings_ms: dict[str, float]


@dataclass
class ResultCounters:
    """What a session remembers between results: unit count, last listen state, last KV length."""

    units_done: int = 0
    last_is_listen: bool = True
    kv_cache_length: int = 0


def _cost(total: float) -> float | None:
    return round(total, 3) if total else None


def build_result(
    units: Sequence[UnitLike],
    counters: ResultCounters,
    listen_audio: str,
    wall_clock_ms: float,
    warnings: Sequence[WarningItem] = (),
    unit_ms: float = 1000.0,
) -> dict[str, Any]:
    """One legacy `result` for all units a chunk ran (PROTOCOL.md §1.8, §4 rows 9-10); updates `counters`.

    No units -> the chunk was buffered: `buffered: true`, `units: 0`, counters unchanged.
    """
    if units:
        counters.units_done += len(units)
        counters.last_is_listen = all(u.is_listen for u in units)
        counters.kv_cache_length = units[-1].kv_cache_length
    is_listen = counters.last_is_listen
    if not units:
        audio_data = ""
    elif is_listen:
        audio_data = _SILENCE_1S_BASE64 if listen_audio == "silence" else ""
    else:
        spoken = [u.audio for u in units if not u.is_listen and len(u.audio)]
        pcm = np.concatenate(spoken).astype("<f4") if spoken else np.zeros(0, dtype="<f4")
        audio_data = base64.b64encode(pcm.tobytes()).decode("ascii")

    def total(key: str) -> float:
        return sum(float(u.timings_ms.get(key, 0.0)) for u in units)

    result: dict[str, Any] = {
        "type": "result",
        "is_listen": is_listen,
        "text": "".join(u.text for u in units),
        "audio_data": audio_data,
        "end_of_turn": any(u.end_of_turn for u in units),
        "current_time": counters.units_done,
        "current_time_ms": int(counters.units_done * unit_ms),
        "cost_llm_ms": _cost(total("llm")),
        "cost_tts_prep_ms": _cost(total("tts_prep")),
        "cost_tts_ms": _cost(total("tts")),
        "cost_token2wav_ms": _cost(total("token2wav")),
        "cost_all_ms": _cost(total("generate")),
        "cost_prefill_ms": _cost(total("prefill")),
        "n_tokens": sum(u.n_tokens for u in units),
        "n_tts_tokens": sum(u.n_tts_tokens for u in units),
        "server_send_ts": time.time(),
        "wall_clock_ms": round(wall_clock_ms, 3),
        "kv_cache_length": counters.kv_cache_length,
        "vision_slices": sum(u.vision_slices for u in units),
        "vision_tokens": sum(u.vision_tokens for u in units),
        "units": len(units),
    }
    if not units:
        result["buffered"] = True
    if warnings:
        result["warnings"] = list(warnings)
    return result
