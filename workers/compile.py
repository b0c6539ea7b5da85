"""torch.compile of the model backbones and the warm-up session on a real MP4 (DESIGN.md §5, MODEL.md §8).

* `configure_compile_cache(dir)` points Inductor's on-disk cache (`TORCHINDUCTOR_CACHE_DIR`) at the
  configured directory; call it before anything is compiled.
* `apply_torch_compile(engine, cfg)` compiles the inner backbones in place (`nn.Module.compile`), so
  compiled and eager code share the same parameters and state-dict names; the Python loops around
  them (decode loop, streaming encoders, vocoder driver) stay eager.
* `warmup_compile(engine, clip)` runs one real duplex session over the clip: per unit prefill ->
  generate -> finalize, with speaking forced on some units so that TTS and token2wav run too, and
  closes the session afterwards.
* `compile_cache_counters()` reads Inductor's FX-graph cache hit/miss counters, which tell whether a
  start compiled cold or loaded its kernels from the cache.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.config import REPO_ROOT, CompileConfig, SessionSettings
from workers.media import MediaClip

log = logging.getLogger("workers.compile")

WARMUP_MP4 = REPO_ROOT / "assets" / "warmup.mp4"
WARMUP_SYSTEM_PROMPT = "Streaming Omni Conversation."
PRECOMPILE_RECORD = "precompile.json"
DECODER_TARGETS = ("llm", "tts")

ProgressCallback = Callable[[int, int, str], None]


def configure_compile_cache(cache_dir: str | Path) -> Path:
    """Set TORCHINDUCTOR_CACHE_DIR (relative paths are taken from the repository root); returns it."""
    path = Path(cache_dir)
    if not path.is_absolute():
        path = REPO_ROOT / path
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_cache_counters() -> dict[str, int]:
    """Inductor FX-graph and AOTAutograd cache hits/misses so far in this process."""
    from torch._dynamo.utils import counters

    return {
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
        "autograd_cache_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
        "autograd_cache_miss": int(counters["aot_autograd"]["autograd_cache_miss"]),
    }


def cache_verdict(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Hits and misses between two `compile_cache_counters()` snapshots, and a one-word verdict."""
    hits = after["fxgraph_cache_hit"] - before["fxgraph_cache_hit"]
    misses = after["fxgraph_cache_miss"] - before["fxgraph_cache_miss"]
    if hits and not misses:
        verdict = "hit"
    elif hits:
        verdict = "partial"
    elif misses:
        verdict = "miss"
    else:
        verdict = "none"
    return {"hits": hits, "misses": misses, "verdict": verdict}


def describe_cache(cache: dict[str, Any], compile_s: float) -> str:
    """One log phrase: where the compiled kernels came from and how long compiling took."""
    counts = f"{cache['hits']} cache hits, {cache['misses']} misses"
    source = {
        "hit": "compiled kernels loaded from the cache",
        "partial": "compiled kernels partly loaded from the cache",
        "miss": "cold compile (nothing in the cache)",
    }.get(cache["verdict"], "nothing compiled")
    return f"{source} ({counts}): compile took {compile_s:.1f} s"


def compile_targets(engine: Any) -> dict[str, list[nn.Module]]:
    """The modules each name of `CompileConfig.modules` stands for (token2wav: its three networks)."""
    model, token2wav = engine.model, engine.token2wav
    return {
        "vpm": [model.vpm],
        "llm": [model.llm.model],
        "resampler": [model.resampler],
        "tts": [model.tts.model],
        "apm": [model.apm],
        "token2wav": [token2wav.flow.encoder, token2wav.flow.estimator, token2wav.hift],
    }


def apply_torch_compile(engine: Any, cfg: CompileConfig) -> list[str]:
    """Compile the configured backbones in place; enables TF32 on CUDA. Returns the compiled names."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    targets = compile_targets(engine)
    acceleration = engine.info.get("acceleration", "eager")
    names = list(cfg.modules)
    if acceleration != "eager":
        # The engine's decoder runners already compile llm.model and tts.model in this mode.
        names = [name for name in names if name not in DECODER_TARGETS]
        log.info("llm and tts decoders: compiled by the engine's %s runners", acceleration)
    for name in names:
        for module in targets[name]:
            module.compile(mode=cfg.mode, dynamic=cfg.dynamic, fullgraph=cfg.fullgraph)
    log.info(
        "torch.compile(mode=%s, dynamic=%s, fullgraph=%s): %s",
        cfg.mode,
        cfg.dynamic,
        cfg.fullgraph,
        ", ".join(names) or "nothing",
    )
    return names


@dataclass
class WarmupReport:
    """What one warm-up pass did: per-unit timings, wall time, spoken units, compile-cache counts."""

    units: list[dict[str, Any]] = field(default_factory=list)
    total_s: float = 0.0
    speak_units: int = 0
    tokens: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _format_unit_line(index: int, total: int, timings: dict[str, float], is_listen: bool) -> str:
    def ms(key: str) -> str:
        return f"{timings.get(key, 0.0):.0f}ms"

    return (
        f"unit={index}/{total} prefill: vision={ms('vision')} audio={ms('audio')} total={ms('prefill')} | "
        f"generate: llm={ms('llm')} tts={ms('tts')} token2wav={ms('token2wav')} | "
        f"{'LISTEN' if is_listen else 'SPEAK'}"
    )


def warmup_compile(
    engine: Any,
    clip: MediaClip,
    progress: ProgressCallback | None = None,
    max_slice_nums: int = 1,
) -> WarmupReport:
    """Run one real duplex session over `clip` (audio + 1 fps frames); close it afterwards.

    The session uses the engine's `forced` schedule (listen 3 units, then speak 5, ...) with greedy
    decoding, so vision, audio, LLM, TTS and token2wav all run and two runs are comparable. One log
    line per unit; `report.tokens` holds each unit's text.
    """
    units_total = units_in(clip, engine)
    report = WarmupReport()
    started = time.perf_counter()
    session = engine.new_session("warmup", schedule="forced")
    try:
        session.prepare(WARMUP_SYSTEM_PROMPT, SessionSettings(decode_mode="greedy", seed=0), None, None)
        unit_index = 0
        for second, samples in enumerate(clip.audio_chunks):
            session.push_audio(samples)
            for _ in range(session.ready_units()):
                unit_index += 1
                result = session.run_unit(clip.frame_images(second), max_slice_nums=max_slice_nums)
                session.finalize()
                line = _format_unit_line(unit_index, units_total, result.timings_ms, result.is_listen)
                log.info(line)
                report.units.append({"unit": unit_index, "is_listen": result.is_listen, **result.timings_ms})
                report.speak_units += 0 if result.is_listen else 1
                report.tokens.append(result.text)
                if progress is not None:
                    progress(unit_index, units_total, line)
    finally:
        session.close()
    report.total_s = time.perf_counter() - started
    return report


def units_in(clip: MediaClip, engine: Any) -> int:
    """Units the clip yields: one per complete `duplex.unit_chunk_samples` of audio."""
    return sum(len(chunk) for chunk in clip.audio_chunks) // engine.cfg.duplex.unit_chunk_samples


def write_precompile_record(cache_dir: Path, record: dict[str, Any]) -> Path:
    """Remember what precompile measured (cold compile time), so a later start can compare."""
    path = cache_dir / PRECOMPILE_RECORD
    path.write_text(json.dumps(record, indent=2))
    return path


def read_precompile_record(cache_dir: Path) -> dict[str, Any] | None:
    path = cache_dir / PRECOMPILE_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
