"""workers/protocol.py: the bad-input rows of PROTOCOL.md §4 decided by parsing, and `result` building."""

from __future__ import annotations

import base64
import io
import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from common.config import ServiceConfig, load_config
from workers import protocol
from workers.protocol import ProtocolError, ResultCounters


@pytest.fixture(scope="module")
def cfg() -> ServiceConfig:
    return ServiceConfig()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pcm(samples: np.ndarray) -> str:
    return b64(np.asarray(samples, dtype="<f4").tobytes())


def jpeg(width: int = 32, height: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1, fmt: str = "pcm16") -> bytes:
    """A WAV file built by hand (int16 PCM, 24-bit PCM or float32), interleaved channels."""
    frames = np.repeat(samples[:, None], channels, axis=1).reshape(-1)
    if fmt == "pcm16":
        tag, bits, body = 1, 16, (frames * 32767).astype("<i2").tobytes()
    elif fmt == "pcm24":
        ints = (frames * (2**23 - 1)).astype("<i4")
        tag, bits, body = 1, 24, b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    else:
        tag, bits, body = 3, 32, frames.astype("<f4").tobytes()
    block = channels * bits // 8
    fmt_chunk = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    chunks = (
        b"fmt "
        + struct.pack("<I", len(fmt_chunk))
        + fmt_chunk
        + b"data"
        + struct.pack("<I", len(body))
        + body
    )
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def expect_error(code: str, fn, *args) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    assert info.value.code == code, info.value.message
    return info.value


# --- rows 1-4: frames -------------------------------------------------------------------------


def test_row1_bad_json():
    expect_error("bad_json", protocol.parse_text_frame, "{not json")


@pytest.mark.parametrize("text", ['{"type": "resume", "x": ' + "1" * 5000 + "}",  # over Python's int digit limit
                                  '{"type": "resume", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_row1_json_python_cannot_load_is_bad_json(text):
    expect_error("bad_json", protocol.parse_text_frame, text)


@pytest.mark.parametrize("text", ["[1, 2]", "42", '"prepare"', "{}", '{"type": 3}', '{"type": null}'])
def test_row2_bad_message(text):
    expect_error("bad_message", protocol.parse_text_frame, text)


def test_valid_frame_parses():
    assert protocol.parse_text_frame('{"type": "stop", "extra": 1}') == {"type": "stop", "extra": 1}


def test_error_frame_shape():
    frame = protocol.error_frame("unknown_type", "Unknown message type: video_frame", chunk_index=3)
    assert frame == {
        "type": "error",
        "error": "Unknown message type: video_frame",
        "code": "unknown_type",
        "message": "Unknown message type: video_frame",
        "fatal": False,
        "chunk_index": 3,
    }
    assert "chunk_index" not in protocol.error_frame("bad_json", "x", fatal=True)


# --- rows 5-8, 11: audio ----------------------------------------------------------------------


@pytest.mark.parametrize("message", [{"type": "audio_chunk"}, {"type": "audio_chunk", "audio_base64": ""}])
def test_row5_missing_audio(cfg, message):
    error = expect_error("missing_audio", protocol.parse_audio_chunk, message, cfg)
    assert error.message == "Missing audio_base64"


def test_row6_bad_base64(cfg):
    expect_error("bad_base64", protocol.parse_audio_chunk, {"audio_base64": "@@@not base64@@@"}, cfg)


def test_row7_bad_pcm_length(cfg):
    expect_error("bad_pcm_length", protocol.parse_audio_chunk, {"audio_base64": b64(b"\x00" * 10)}, cfg)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_row8_non_finite_audio(cfg, bad):
    samples = np.zeros(1600, dtype=np.float32)
    samples[100] = bad
    expect_error("non_finite_audio", protocol.parse_audio_chunk, {"audio_base64": pcm(samples)}, cfg)


def test_row8_values_beyond_one_are_clipped(cfg):
    chunk = protocol.parse_audio_chunk({"audio_base64": pcm(np.array([2.0, -3.0, 0.5]))}, cfg)
    np.testing.assert_array_equal(chunk.samples, np.array([1.0, -1.0, 0.5], dtype=np.float32))


def test_row11_chunk_too_long(cfg):
    samples = np.zeros(int(cfg.service.limits.max_chunk_s * 16000) + 1, dtype=np.float32)
    expect_error("chunk_too_long", protocol.parse_audio_chunk, {"audio_base64": pcm(samples)}, cfg)


def test_base64_leniency_and_audio_alias(cfg):
    samples = np.linspace(-0.5, 0.5, 802, dtype=np.float32)  # 3208 bytes: base64 ends in padding
    standard = pcm(samples)
    assert standard.endswith("=")
    url_safe = standard.replace("+", "-").replace("/", "_").rstrip("=")
    for text in (standard, standard.rstrip("="), url_safe, "data:audio/pcm;base64," + standard):
        chunk = protocol.parse_audio_chunk({"audio": text}, cfg)
        np.testing.assert_array_equal(chunk.samples, samples)
    both = protocol.parse_audio_chunk({"audio_base64": pcm(np.ones(4)), "audio": pcm(np.zeros(8))}, cfg)
    assert both.samples.size == 4  # audio_base64 wins


# --- rows 12-13, 20-21: frames, slicing, force_listen ----------------------------------------


def test_row12_bad_frame_keeps_audio(cfg):
    chunk = protocol.parse_audio_chunk(
        {"audio_base64": pcm(np.zeros(16000)), "frame_base64_list": [b64(b"not a jpeg"), b64(jpeg()), "%%%"]},
        cfg,
    )
    assert chunk.samples.size == 16000
    assert len(chunk.frames) == 1 and chunk.frames[0].size == (32, 24) and chunk.frames[0].mode == "RGB"
    assert [w["code"] for w in chunk.warnings] == ["bad_frame", "bad_frame"]


def test_row13_frame_too_large_and_too_many(cfg):
    small = load_config(
        overrides={"service.limits.max_frame_pixels": 100, "service.limits.max_frame_bytes": 2048}
    )
    big_bytes = b64(b"\xff\xd8" + b"\x00" * 4096)
    chunk = protocol.parse_audio_chunk(
        {
            "audio_base64": pcm(np.zeros(10)),
            "frame_base64_list": [b64(jpeg(8, 8)), b64(jpeg(20, 20)), big_bytes],
        },
        small,
    )
    assert len(chunk.frames) == 1
    assert [w["code"] for w in chunk.warnings] == ["frame_too_large", "frame_too_large"]

    many = [b64(jpeg())] * 6
    chunk = protocol.parse_audio_chunk({"audio_base64": pcm(np.zeros(10)), "frame_base64_list": many}, cfg)
    assert len(chunk.frames) == cfg.service.limits.max_frames_per_chunk == 4
    assert [w["code"] for w in chunk.warnings] == ["too_many_frames"]


@pytest.mark.parametrize(
    "value, expected, warned",
    [
        (2, 2, False),
        (1, 1, False),
        (0, 1, True),
        (12, 9, True),
        (-3, 1, True),
        ("2", 1, True),
        (2.5, 2, True),
        (True, 1, True),
        pytest.param(10**400, 9, True, id="beyond-a-float"),
        pytest.param(-(10**400), 1, True, id="below-a-float"),
    ],
)
def test_row20_max_slice_nums_clamped(cfg, value, expected, warned):
    chunk = protocol.parse_audio_chunk({"audio_base64": pcm(np.zeros(4)), "max_slice_nums": value}, cfg)
    assert chunk.max_slice_nums == expected
    assert [w["code"] for w in chunk.warnings] == (["max_slice_nums_clamped"] if warned else [])


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (1, True), ("yes", True), (0, False), ("", False), (None, False), ([], False)],
)
def test_row21_force_listen_truthiness(cfg, value, expected):
    chunk = protocol.parse_audio_chunk({"audio_base64": pcm(np.zeros(4)), "force_listen": value}, cfg)
    assert chunk.force_listen is expected


# --- rows 17-20: prepare ----------------------------------------------------------------------


def test_prepare_defaults(cfg):
    request = protocol.parse_prepare({"type": "prepare"}, cfg)
    assert request.system_prompt == cfg.duplex.system_prompt
    assert request.settings == cfg.duplex.session_defaults
    assert request.ref_audio is None and request.tts_ref_audio is None
    assert request.max_slice_nums == 1 and request.deferred_finalize is True
    assert request.listen_audio == "silence" and request.warnings == []


def test_prepare_config_applied_and_top_level_slices_win(cfg):
    request = protocol.parse_prepare(
        {
            "config": {
                "length_penalty": 1.3,
                "max_kv_tokens": 8000,
                "max_slice_nums": 3,
                "listen_audio": "empty",
                "chunk_ms": 500,
                "sample_rate": 16000,
            },
            "max_slice_nums": 2,
        },
        cfg,
    )
    assert request.settings.length_penalty == 1.3 and request.listen_audio == "empty"
    assert request.max_slice_nums == 2
    assert [w["code"] for w in request.warnings] == ["unsupported_chunk_ms"]
    assert protocol.parse_prepare({"config": {"max_slice_nums": 3}}, cfg).max_slice_nums == 3


@pytest.mark.parametrize(
    "config, key",
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": "high"}, "top_p"),
        ({"decode_mode": "beam"}, "decode_mode"),
        ({"ls_mode": "implicit"}, "ls_mode"),
        ({"force_listen_count": -1}, "force_listen_count"),
        ({"temperature": "0.5"}, "temperature"),  # wrong types are rejected, not coerced
        ({"generate_audio": "no"}, "generate_audio"),
        ({"top_k": 20.5}, "top_k"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -1}, "seed"),
    ],
)
def test_row18_invalid_config_names_the_key(cfg, config, key):
    error = expect_error("invalid_config", protocol.parse_prepare, {"config": config}, cfg)
    assert key in error.message


def test_row18_config_not_an_object(cfg):
    expect_error("invalid_config", protocol.parse_prepare, {"config": [1]}, cfg)


def test_prepare_ref_audio_raw_pcm_and_tts_fallback(cfg):
    voice = np.sin(np.arange(16000) / 10.0).astype(np.float32) * 0.3
    request = protocol.parse_prepare({"ref_audio_base64": pcm(voice)}, cfg)
    np.testing.assert_array_equal(request.ref_audio, voice)
    assert request.tts_ref_audio is request.ref_audio
    other = protocol.parse_prepare(
        {"ref_audio_base64": pcm(voice), "tts_ref_audio_base64": pcm(voice[:800])}, cfg
    )
    assert other.tts_ref_audio.size == 800


@pytest.mark.parametrize(
    "fmt, rate, channels", [("pcm16", 16000, 1), ("pcm16", 48000, 2), ("float", 24000, 1), ("pcm24", 8000, 2)]
)
def test_prepare_ref_audio_wav(cfg, fmt, rate, channels):
    seconds = 0.5
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    request = protocol.parse_prepare({"ref_audio_base64": b64(wav_bytes(tone, rate, channels, fmt))}, cfg)
    audio = request.ref_audio
    assert audio.dtype == np.float32 and abs(audio.size - 8000) <= 1
    expected = 0.5 * np.sin(2 * np.pi * 220 * np.arange(audio.size) / 16000)
    assert np.max(np.abs(audio - expected)[:-2]) < 0.02  # the last samples extrapolate


@pytest.mark.parametrize(
    "payload",
    [
        "!!!",  # not base64
        b64(b"\x00" * 6),  # length not a multiple of 4
        pcm(np.array([0.1, np.nan])),  # non-finite
        pcm(np.zeros(31 * 16000)),  # longer than 30 s
        b64(b"RIFF\x10\x00\x00\x00WAVEjunk"),  # unreadable WAV
        b64(
            wav_bytes(np.zeros(100, dtype=np.float32), 16000)[:40].replace(
                b"\x01\x00\x01\x00", b"\x07\x00\x01\x00"
            )
        ),
        b64(wav_bytes(np.zeros(40, dtype=np.float32), 1)),  # 40 s at a declared 1 Hz: too long, found before resampling
    ],
)
def test_row17_bad_ref_audio(cfg, payload):
    expect_error("bad_ref_audio", protocol.parse_prepare, {"ref_audio_base64": payload}, cfg)
    expect_error("bad_ref_audio", protocol.parse_prepare, {"tts_ref_audio_base64": payload}, cfg)


def test_row17_voice_shorter_than_the_encoder_takes(cfg):
    error = expect_error("bad_ref_audio", protocol.parse_prepare, {"ref_audio_base64": pcm(np.zeros(1))}, cfg)
    assert "shorter than 0.1 s" in error.message
    # the vocoder's reference has no such floor
    assert protocol.parse_prepare({"tts_ref_audio_base64": pcm(np.zeros(800))}, cfg).tts_ref_audio.size == 800


def test_row19_ref_audio_path(tmp_path):
    voice_dir = tmp_path / "voices"
    voice_dir.mkdir()
    (voice_dir / "me.wav").write_bytes(wav_bytes(np.zeros(1600, dtype=np.float32), 16000))
    (tmp_path / "secret.wav").write_bytes(wav_bytes(np.zeros(1600, dtype=np.float32), 16000))
    closed = ServiceConfig()
    expect_error("ref_audio_path_forbidden", protocol.parse_prepare, {"ref_audio_path": "me.wav"}, closed)
    allowed = load_config(overrides={"service.ref_audio_dir": str(voice_dir)})
    assert protocol.parse_prepare({"ref_audio_path": "me.wav"}, allowed).ref_audio.size == 1600
    assert (
        protocol.parse_prepare({"ref_audio_path": str(voice_dir / "me.wav")}, allowed).ref_audio.size == 1600
    )
    for escape in ("../secret.wav", str(tmp_path / "secret.wav")):
        expect_error("ref_audio_path_forbidden", protocol.parse_prepare, {"ref_audio_path": escape}, allowed)
    expect_error("bad_ref_audio", protocol.parse_prepare, {"ref_audio_path": "missing.wav"}, allowed)


def test_pause_timeout_clamped():
    assert protocol.parse_pause_timeout({}, 60.0) == 60.0
    assert protocol.parse_pause_timeout({"timeout": 0.2}, 60.0) == 1.0
    assert protocol.parse_pause_timeout({"timeout": 1000}, 60.0) == 300.0
    assert protocol.parse_pause_timeout({"timeout": "soon"}, 60.0) == 60.0
    assert protocol.parse_pause_timeout({"timeout": 10**400}, 60.0) == 300.0  # beyond a float


# --- result building (rows 9-10, PROTOCOL.md §1.8) -------------------------------------------


@dataclass
class Unit:
    is_listen: bool = True
    text: str = ""
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    end_of_turn: bool = False
    n_tokens: int = 1
    n_tts_tokens: int = 0
    kv_cache_length: int = 100
    vision_slices: int = 1
    vision_tokens: int = 64
    timings_ms: dict = field(default_factory=lambda: {"prefill": 20.0, "llm": 5.0, "generate": 6.0})


RESULT_FIELDS = {
    "type",
    "is_listen",
    "text",
    "audio_data",
    "end_of_turn",
    "current_time",
    "current_time_ms",
    "cost_llm_ms",
    "cost_tts_prep_ms",
    "cost_tts_ms",
    "cost_token2wav_ms",
    "cost_all_ms",
    "cost_prefill_ms",
    "n_tokens",
    "n_tts_tokens",
    "server_send_ts",
    "wall_clock_ms",
    "kv_cache_length",
    "vision_slices",
    "vision_tokens",
    "units",
}


def decode_audio(result: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(result["audio_data"]), dtype="<f4")


def test_listen_result_silence_vs_empty():
    counters = ResultCounters()
    result = protocol.build_result([Unit()], counters, "silence", 12.5)
    assert RESULT_FIELDS <= result.keys() and "buffered" not in result and "warnings" not in result
    silence = decode_audio(result)
    assert silence.size == 24000 and not silence.any()
    assert result["is_listen"] is True and result["current_time"] == 1 and result["current_time_ms"] == 1000
    assert result["cost_tts_ms"] is None and result["cost_llm_ms"] == 5.0 and result["cost_all_ms"] == 6.0
    assert result["cost_prefill_ms"] == 20.0 and result["kv_cache_length"] == 100
    assert (result["vision_slices"], result["vision_tokens"], result["units"]) == (1, 64, 1)
    json.dumps(result)
    empty = protocol.build_result([Unit()], counters, "empty", 1.0)
    assert empty["audio_data"] == "" and empty["current_time"] == 2


def test_row9_short_chunk_is_buffered():
    counters = ResultCounters(units_done=3, last_is_listen=False, kv_cache_length=321)
    result = protocol.build_result([], counters, "silence", 0.5, [protocol.warning("bad_frame", "x")])
    assert result["buffered"] is True and result["units"] == 0
    assert result["text"] == "" and result["audio_data"] == "" and result["is_listen"] is False
    assert result["current_time"] == 3 and result["kv_cache_length"] == 321
    assert result["cost_all_ms"] is None and result["n_tokens"] == 0
    assert result["warnings"] == [{"code": "bad_frame", "message": "x"}]


def test_row10_long_chunk_aggregates_units():
    counters = ResultCounters()
    speech = np.full(24000, 0.25, dtype=np.float32)
    units = [
        Unit(),
        Unit(
            is_listen=False,
            text="Hello ",
            audio=speech,
            n_tokens=3,
            n_tts_tokens=25,
            kv_cache_length=150,
            timings_ms={"llm": 10.0, "tts": 30.0, "token2wav": 40.0, "generate": 80.0},
        ),
        Unit(
            is_listen=False,
            text="world",
            audio=speech[:12000],
            end_of_turn=True,
            n_tokens=2,
            n_tts_tokens=12,
            kv_cache_length=180,
            timings_ms={"llm": 10.0, "generate": 10.0},
        ),
    ]
    result = protocol.build_result(units, counters, "silence", 300.0)
    assert result["units"] == 3 and result["text"] == "Hello world"
    assert result["is_listen"] is False and result["end_of_turn"] is True
    assert decode_audio(result).size == 36000
    assert result["n_tokens"] == 6 and result["n_tts_tokens"] == 37
    assert (
        result["cost_llm_ms"] == 25.0
        and result["cost_token2wav_ms"] == 40.0
        and result["cost_all_ms"] == 96.0
    )
    assert result["current_time"] == 3 and result["kv_cache_length"] == 180
    all_listen = protocol.build_result([Unit(), Unit()], counters, "silence", 1.0)
    assert all_listen["is_listen"] is True and all_listen["current_time"] == 5
