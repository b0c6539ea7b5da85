"""Duplex session benchmark: one in-process session over an MP4, per-unit and per-stage timings.

    python -m bench.duplex --preset tiny --device cpu --dtype auto --units 10 --schedule forced \\
        --mp4 assets/warmup.mp4 --json

The MP4 is decoded into 1 s 16 kHz chunks and 1 fps JPEG frames (workers/media.py); units cycle through
the clip when more units than seconds are asked for. A warm-up session (`--warmup-units`, default one
forced cycle) runs first and is not measured, so one-off costs (allocator, kernel selection) stay out of
the numbers. A unit's time is run_unit + its finalize (the work the worker does per second of input).
Stage means follow the engine's `timings_ms`: `prefill` includes `vision` and `audio`; `llm` is the
decode loop; `tts` includes building its condition.

`forced` (default) is MODEL.md §2.4's scripted driver: the work per unit is fixed, so runs compare;
`natural` lets the (random or real) weights decide. Prints one JSON object with `--json`.

`--mode eager,compile-default,fast` measures several acceleration modes side by side in one run (one
engine per mode, built, warmed, measured and freed in turn) and reports speak/listen p50 ratios. A mode may
carry `compile` config overrides, `MODE+KEY=VALUE...`: `fast,fast+token_steps=false` measures `fast` with
and without its token steps. The modes:
* `eager`: plain PyTorch modules;
* `compile-default`: the reference system's setting, torch.compile(mode="default", dynamic=True) on
  vpm, resampler and the LLM and TTS backbones;
* `fast`: the decoders' CUDA-graph runners (workers/engine/runners.py) plus torch.compile of the
  fixed-shape encoders (and token2wav with `--fast-compile token2wav`).
`setup_s` is the time from an engine built to its first measured unit: compile, graph capture and the
warm-up session.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import CompileConfig, ServiceConfig, SessionSettings
from workers.compile import apply_torch_compile, configure_compile_cache
from workers.engine.engine import DuplexEngine
from workers.engine.runners import MODES
from workers.engine.session import DuplexSession, UnitResult
from workers.media import load_media

SYSTEM_PROMPT = "Streaming Omni Conversation."
DEFAULT_VOICE = Path("assets/default_voice.wav")
STAGES = ("vision", "audio", "prefill", "llm", "tts", "token2wav")
FORCED_CYCLE_UNITS = 8
CODES_PER_SECOND = 25  # TTS codes per second of speech (MODEL.md)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def mode_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`MODE[+KEY=VALUE...]` -> (acceleration mode, `compile` config overrides), e.g. `fast+token_steps=false`."""
    mode, *pairs = spec.split("+")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in CompileConfig.model_fields:
            raise ValueError(f"{pair!r} is not KEY=VALUE with a compile config key")
        overrides[key] = value
    CompileConfig.model_validate(overrides)  # a value that does not parse fails here, before any engine
    return mode, overrides


def _modes(text: str) -> list[str]:
    specs = [m.strip() for m in text.split(",") if m.strip()]
    if not specs:
        raise argparse.ArgumentTypeError(f"no mode given; choose from {', '.join(MODES)}")
    try:
        for spec in specs:
            mode_spec(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return specs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.duplex", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["tiny", "minicpm-o-4.5"], default="tiny")
    parser.add_argument("--model-path", default=None, help="checkpoint directory (real weights)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--mode", type=_modes, default=["eager"],
                        help=f"acceleration mode(s), comma-separated from {', '.join(MODES)}")
    parser.add_argument("--fast-compile", default="vpm,resampler,token2wav",
                        help="modules torch.compile'd in fast mode (vpm, resampler, apm, token2wav)")
    parser.add_argument("--cache-dir", default="torch_compile_cache", help="TORCHINDUCTOR_CACHE_DIR")
    parser.add_argument("--schedule", choices=["natural", "forced"], default="forced")
    parser.add_argument("--units", type=_positive_int, default=10, help="measured units")
    parser.add_argument("--warmup-units", type=int, default=FORCED_CYCLE_UNITS)
    parser.add_argument("--mp4", default="assets/warmup.mp4")
    parser.add_argument("--voice", default=str(DEFAULT_VOICE), help="reference voice (16 kHz after decode)")
    parser.add_argument("--max-slice-nums", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=None, help="also write the report here (rewritten after each mode)")
    return parser.parse_args(argv)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_units(session: DuplexSession, chunks: list[np.ndarray], frames: list[list], units: int,
              max_slice_nums: int) -> list[tuple[UnitResult, float, float]]:
    """(result, unit ms incl. finalize, finalize ms) per unit, cycling through the clip."""
    out = []
    for index in range(units):
        session.push_audio(chunks[index % len(chunks)])
        start = time.perf_counter()
        result = session.run_unit(frames[index % len(frames)], max_slice_nums=max_slice_nums)
        session.finalize()
        total_ms = (time.perf_counter() - start) * 1000.0
        out.append((result, total_ms, session.last_finalize_ms))
        if result.session_end:
            break
    return out


def summarize(measured: list[tuple[UnitResult, float, float]]) -> dict[str, Any]:
    listen = [ms for r, ms, _ in measured if r.is_listen]
    speak = [ms for r, ms, _ in measured if not r.is_listen]
    stage_means = {stage: statistics.fmean(r.timings_ms.get(stage, 0.0) for r, _, _ in measured)
                   for stage in STAGES}
    stage_means["finalize"] = statistics.fmean(fin for _, _, fin in measured)
    speak_results = [r for r, _, _ in measured if not r.is_listen]
    decode_steps = sum(r.decode_steps for r in speak_results)
    tts_codes = sum(r.n_tts_tokens for r in speak_results)
    return {
        "listen": {"count": len(listen), "p50_ms": percentile(listen, 50), "p95_ms": percentile(listen, 95)},
        "speak": {"count": len(speak), "p50_ms": percentile(speak, 50), "p95_ms": percentile(speak, 95)},
        "stage_means_ms": stage_means,
        "llm_decode_step_ms": (sum(r.timings_ms.get("llm", 0.0) for r in speak_results) / decode_steps
                               if decode_steps else None),
        "tts_decode_step_ms": (sum(r.timings_ms.get("tts", 0.0) for r in speak_results) / tts_codes
                               if tts_codes else None),
        # token2wav's time per second of speech (25 codes; a turn's last unit also flushes the vocoder)
        "token2wav_ms_per_speech_s": (sum(r.timings_ms.get("token2wav", 0.0) for r in speak_results)
                                      * CODES_PER_SECOND / tts_codes if tts_codes else None),
        "session_end": next((r.session_end for r, _, _ in measured if r.session_end), None),
    }


def accelerate(engine: DuplexEngine, mode: str, fast_compile: list[str]) -> None:
    """Compile what `mode` compiles besides the decoder runners (which the engine built); in `fast` mode
    then warm up, so that the captured graphs (decoders, token2wav, vision) hold the compiled code."""
    if mode == "compile-default":
        apply_torch_compile(engine, CompileConfig(mode="default", dynamic=True, modules=["vpm", "resampler"]))
    elif mode == "fast":
        if fast_compile:
            apply_torch_compile(engine, CompileConfig(mode="default", dynamic=False, modules=fast_compile))
        engine.warmup()


def measure_mode(args: argparse.Namespace, spec: str, chunks: list[np.ndarray], frames: list[list],
                 voice: np.ndarray | None) -> dict[str, Any]:
    """Build an engine for the mode spec (`mode_spec`), warm it up with one forced cycle, measure `args.units`
    units."""
    mode, overrides = mode_spec(spec)
    cfg = ServiceConfig.model_validate({"model": {
        "preset": args.preset, "model_path": args.model_path, "device": args.device, "dtype": args.dtype,
        "seed": args.seed, "acceleration": mode,
    }, "compile": overrides})
    load_start = time.perf_counter()
    engine = DuplexEngine(cfg)
    load_s = time.perf_counter() - load_start

    def run_session(units: int) -> list[tuple[UnitResult, float, float]]:
        session = engine.new_session("bench", schedule=args.schedule)
        try:
            session.prepare(SYSTEM_PROMPT, SessionSettings(seed=args.seed), voice, None)
            return run_units(session, chunks, frames, units, args.max_slice_nums)
        finally:
            session.close()

    setup_start = time.perf_counter()
    accelerate(engine, mode, [m for m in args.fast_compile.split(",") if m])
    if args.warmup_units > 0:
        run_session(args.warmup_units)
    setup_s = time.perf_counter() - setup_start
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    measured = run_session(args.units)
    peak = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if engine.device.type == "cuda":
        peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(engine.device)
    result = {
        "mode": spec,
        "device": device_name(engine.device),
        "dtype": engine.info["dtype"],
        "logits_dtype": engine.info["logits_dtype"],
        "weights": engine.info["weights"],
        "preset": engine.info["preset"],
        "max_kv_tokens": engine.max_kv_tokens,
        "load_s": load_s,
        "setup_s": setup_s,
        "units": len(measured),
        **summarize(measured),
        "recompiles_after_warmup": engine.recompiles_since_warmup(),
        "peak_memory": peak,
    }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configure_compile_cache(args.cache_dir)
    clip = load_media(args.mp4)
    frames = [clip.frame_images(i) for i in range(len(clip.audio_chunks))]
    chunks = [np.pad(c, (0, 16_000 - c.size)) for c in clip.audio_chunks]
    voice = (np.concatenate(load_media(args.voice).audio_chunks)
             if args.voice and Path(args.voice).exists() else None)
    modes: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {}
    for mode in args.mode:
        try:
            modes[mode] = measure_mode(args, mode, chunks, frames, voice)
        except Exception as exc:  # one broken mode must not lose the others' numbers
            traceback.print_exc()
            modes[mode] = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"}
        gc.collect()  # the mode's engine (≈ 19 GB at full size) goes before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        report = build_report(args, argv, modes)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))
    return report


def build_report(args: argparse.Namespace, argv: list[str] | None, modes: dict[str, dict[str, Any]]
                 ) -> dict[str, Any]:
    """The JSON report: run settings, versions, each mode's numbers, and the p50 ratios."""
    measured = [m for m in modes.values() if "error" not in m]
    first = measured[0] if measured else {}
    report: dict[str, Any] = {
        "benchmark": "duplex",
        "device": first.get("device"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "preset": args.preset,
        "weights": first.get("weights"),
        "schedule": args.schedule,
        "warmup_units": args.warmup_units,
        "max_slice_nums": args.max_slice_nums,
        "modes": modes,
        "command": "python -m bench.duplex " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if len(modes) == 1 and first:  # one mode: its numbers at the top level too
        report.update({k: v for k, v in first.items() if k not in report})
    report["speedups"] = speedups({name: m for name, m in modes.items() if "error" not in m})
    return report


def speedups(modes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """p50 ratios of each mode against `compile-default` (the reference's setting) and `eager`."""
    out: dict[str, Any] = {}
    for base in ("compile-default", "eager"):
        if base not in modes:
            continue
        for mode, result in modes.items():
            if mode == base:
                continue
            for kind in ("speak", "listen"):
                ours, theirs = result[kind]["p50_ms"], modes[base][kind]["p50_ms"]
                if ours and theirs:
                    out[f"{mode}_vs_{base}_{kind}_p50"] = theirs / ours
    return out


if __name__ == "__main__":
    main()
