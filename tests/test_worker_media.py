"""workers/media.py with the real ffmpeg on real files (the committed warm-up MP4 and files made here)."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
from PIL import Image

from common.config import REPO_ROOT
from workers.media import CHUNK_SAMPLES, MediaError, load_media

WARMUP_MP4 = REPO_ROOT / "assets" / "warmup.mp4"
DEFAULT_VOICE = REPO_ROOT / "assets" / "default_voice.wav"


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def test_warmup_mp4_is_small_and_decodes_to_units():
    assert WARMUP_MP4.stat().st_size < 1_000_000
    clip = load_media(WARMUP_MP4, require_video=True)
    assert clip.duration_s == pytest.approx(10.0, abs=0.05)
    assert len(clip.audio_chunks) == 10 and all(len(c) == CHUNK_SAMPLES for c in clip.audio_chunks)
    audio = np.concatenate(clip.audio_chunks)
    assert audio.dtype == np.float32 and np.isfinite(audio).all()
    assert np.sqrt(np.mean(audio[: CHUNK_SAMPLES * 4] ** 2)) > 0.01  # real speech, not silence
    assert len(clip.frames) == 10
    images = [Image.open(io.BytesIO(f)) for f in clip.frames]
    assert all(image.format == "JPEG" and image.size == (448, 336) for image in images)
    first, second = (np.asarray(image.convert("RGB"), dtype=np.float32) for image in images[:2])
    assert np.abs(first - second).mean() > 1.0  # the picture moves
    assert clip.frame_images(9)[0].mode == "RGB" and clip.frame_images(10) == []


def test_default_voice_wav_is_audio_only():
    clip = load_media(DEFAULT_VOICE)
    assert not clip.has_video and clip.frames == []
    assert 2.0 < clip.duration_s < 6.0
    with pytest.raises(MediaError, match="no video stream"):
        load_media(DEFAULT_VOICE, require_video=True)


def test_resampled_stereo_wav_and_max_seconds(tmp_path):
    path = tmp_path / "tone.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=2.5", "-ac", "2", str(path))
    clip = load_media(path)
    assert [len(c) for c in clip.audio_chunks] == [16000, 16000, 8000]
    assert len(load_media(path, max_seconds=1.0).audio_chunks) == 1


def test_mp4_without_audio(tmp_path):
    path = tmp_path / "silent_video.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=5:duration=1", "-c:v", "libx264", str(path))
    with pytest.raises(MediaError, match="no audio stream"):
        load_media(path)


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a media file" * 100)
    with pytest.raises(MediaError, match="cannot read media file"):
        load_media(garbage)
    with pytest.raises(MediaError, match="not found"):
        load_media(tmp_path / "missing.mp4")


def test_ffmpeg_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no ffmpeg on PATH
    with pytest.raises(MediaError, match="ffmpeg is not installed"):
        load_media(WARMUP_MP4)
