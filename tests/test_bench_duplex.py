"""`python -m bench.duplex` prints one valid JSON report on the tiny preset (real ffmpeg, real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _make_mp4(path: Path, seconds: int = 3) -> Path:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size=320x240:rate=10:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={seconds}",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
        check=True,
    )
    return path


@pytest.mark.slow
def test_bench_prints_one_json_object(tmp_path: Path) -> None:
    mp4 = _make_mp4(tmp_path / "clip.mp4")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.duplex", "--preset", "tiny", "--device", "cpu", "--dtype", "auto",
         "--units", "5", "--warmup-units", "0", "--schedule", "forced", "--mp4", str(mp4), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    report = json.loads(lines[0])
    assert report["preset"] == "tiny" and report["mode"] == "eager" and report["schedule"] == "forced"
    assert report["dtype"] == "float32" and report["torch"] and report["python"] and report["device"]
    assert report["units"] == 5
    assert report["listen"]["count"] == 3 and report["speak"]["count"] == 2  # forced: 3 listen, then speak
    assert 0 < report["listen"]["p50_ms"] <= report["listen"]["p95_ms"]
    assert 0 < report["speak"]["p50_ms"] <= report["speak"]["p95_ms"]
    stages = report["stage_means_ms"]
    assert set(stages) == {"vision", "audio", "prefill", "llm", "tts", "token2wav", "finalize"}
    assert stages["vision"] > 0 and stages["llm"] > 0 and stages["token2wav"] > 0
    assert report["llm_decode_step_ms"] > 0 and report["tts_decode_step_ms"] > 0
    assert report["token2wav_ms_per_speech_s"] > 0
    assert report["peak_memory"]["rss_bytes"] > 0


def test_mode_specs_carry_compile_overrides() -> None:
    from bench.duplex import mode_spec, parse_args

    assert mode_spec("fast") == ("fast", {})
    assert mode_spec("fast+token_steps=false+decode_fusion=0") == ("fast", {"token_steps": "false",
                                                                           "decode_fusion": "0"})
    assert parse_args(["--mode", "fast,fast+token_steps=false"]).mode == ["fast", "fast+token_steps=false"]
    for bad in ("quick", "fast+token_steps", "fast+no_such_key=1", "fast+token_steps=maybe", ","):
        with pytest.raises(SystemExit):
            parse_args(["--mode", bad])
