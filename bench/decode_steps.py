"""Decoder step benchmark: LLM and TTS backbones under eager / compile-default / fast, side by side.

    python -m bench.decode_steps --preset minicpm-o-4.5 --json
    python -m bench.decode_steps --preset tiny --modes eager --steps 3 --json     # CPU smoke run

Random weights (MODEL.md §2.4) in bf16 on CUDA (fp32 on CPU). For each mode, one `DecoderRunner` per
backbone (workers/engine/runners.py) on the same weights; `fast` runs last because it fuses the
projections in place. Measured per mode and backbone:
- `setup_s`: runner construction + `warmup()` (compiles, CUDA-graph captures): the cold start cost when
  the Inductor cache is empty, the warm start cost otherwise;
- `prefill_ms`: one prefill of `--prefill` tokens (LLM) or a TTS condition of 21 tokens, at position 0;
- `decode_ms`: one decode step just after that prefill, and `decode_ms_at_<n>` at a later position
  (4096 for the LLM, half the slot for the TTS);
- `recompiles_after_warmup` (must be 0) and `cuda_graphs`.
Each time is a step as the session sees it (input staging, the step, the output copy): the device is
synchronised before the step, then CUDA events (CPU timers on CPU) bracket it; p50 and p95 over
`--steps` steps after `--warmup-steps` untimed ones. `peak_memory_gb`: peak allocated during the mode.
Prints one JSON object (`--json`) or a table; `--out` also writes the JSON (rewritten after each mode).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from workers.engine.runners import MODES, DecoderRunner
from workers.model.llm import Qwen3ForCausalLM
from workers.model.presets import get_preset
from workers.model.tts import MiniCPMTTS

TTS_CONDITION_TOKENS = 21  # 20 text tokens + audio_bos, a full speaking unit's condition
LATE_POSITION = 4096  # a later decode position (at most half the slot: kv_len stays below the cache length)


def build_decoders(preset: str, device: torch.device, dtype: torch.dtype, llm_len: int, tts_len: int,
                   slots: int = 1, seed: int = 0) -> tuple[Qwen3ForCausalLM, MiniCPMTTS]:
    """Random-weight LLM and TTS of a preset on `device`, caches allocated (`slots` x `*_len`)."""
    args = get_preset(preset)
    torch.manual_seed(seed)
    with torch.device(device):
        llm = Qwen3ForCausalLM(args.llm).to(dtype)
        tts = MiniCPMTTS(args.tts).to(dtype)
    llm.init_weights()
    tts.init_weights()
    tts.fold_weight_norm()
    llm.model.setup_caches(slots, min(llm_len, args.llm.max_positions))
    tts.model.setup_caches(slots, min(tts_len, args.tts.max_positions))
    return llm.eval().requires_grad_(False), tts.eval().requires_grad_(False)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[int], object], count: int, device: torch.device) -> list[float]:
    """Milliseconds of fn(i) for i in range(count), each started on an idle device."""
    times = []
    for index in range(count):
        _synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(index)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn(index)
            times.append(1000.0 * (time.perf_counter() - began))
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """p50 / p95 / min of a list of milliseconds, rounded to microseconds."""
    ordered = sorted(times)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": pick(0.5), "p95": pick(0.95), "min": round(ordered[0], 3), "n": len(ordered)}


def bench_backbone(runner: DecoderRunner, hidden: int, prefill_tokens: int, steps: int, warmup_steps: int,
                   device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Prefill and decode timings of one runner on slot 0 (random inputs; contents do not matter)."""
    generator = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randn(1, prefill_tokens, hidden, device=device, dtype=dtype, generator=generator)
    token = torch.randn(1, 1, hidden, device=device, dtype=dtype, generator=generator)
    total = warmup_steps + steps
    late = min(LATE_POSITION, runner.max_len // 2)

    def prefill(_: int) -> object:
        return runner(prompt, 0, 0)

    def decode(i: int) -> object:
        return runner(token, prefill_tokens + i, 0)

    def decode_late(i: int) -> object:
        return runner(token, late + i, 0)

    result: dict[str, Any] = {}
    for name, fn in (("prefill_ms", prefill), ("decode_ms", decode), (f"decode_ms_at_{late}", decode_late)):
        result[name] = summarize(time_calls(fn, total, device)[warmup_steps:])
    return result


def run_mode(mode: str, llm: Qwen3ForCausalLM, tts: MiniCPMTTS, args: argparse.Namespace,
             device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build, warm up and time the LLM and TTS runners of one mode."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report: dict[str, Any] = {}
    for name, decoder, prefill_tokens in (("llm", llm.model, args.prefill),
                                          ("tts", tts.model, TTS_CONDITION_TOKENS)):
        began = time.perf_counter()
        runner = DecoderRunner(decoder, mode)  # type: ignore[arg-type]
        runner.warmup([0])
        _synchronize(device)
        setup_s = time.perf_counter() - began
        timings = bench_backbone(runner, decoder.norm.weight.shape[0], prefill_tokens, args.steps,
                                 args.warmup_steps, device, dtype)
        report[name] = {"setup_s": round(setup_s, 2), **timings,
                        "recompiles_after_warmup": runner.recompiles_since_warmup(),
                        "cuda_graphs": runner.graph_count}
    if device.type == "cuda":
        report["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return report


def environment(device: torch.device) -> dict[str, Any]:
    """Device name and library versions."""
    info: dict[str, Any] = {"device": platform.processor() or "cpu", "torch": torch.__version__,
                            "python": platform.python_version()}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minicpm-o-4.5")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, timed in this order")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measure")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--prefill", type=int, default=100, help="LLM prefill length in tokens")
    parser.add_argument("--llm-len", type=int, default=8192, help="LLM KV positions per slot (max_kv_tokens)")
    parser.add_argument("--tts-len", type=int, default=4096, help="TTS KV positions per slot")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", type=Path, help="also write the JSON report here (after every mode)")
    return parser.parse_args(argv)


def markdown_table(report: dict[str, Any]) -> str:
    """One row per mode and backbone: p50 prefill / decode times, setup time, recompiles."""
    lines = [f"{report['env']['device']} - torch {report['env']['torch']} - preset {report['preset']}", "",
             "| mode | backbone | setup s | prefill ms | decode ms | late decode ms | recompiles |",
             "|---|---|---|---|---|---|---|"]
    for mode, per_mode in report["modes"].items():
        for backbone in ("llm", "tts"):
            r = per_mode[backbone]
            late = next(value for key, value in r.items() if key.startswith("decode_ms_at_"))
            lines.append(f"| {mode} | {backbone} | {r['setup_s']} | {r['prefill_ms']['p50']} "
                         f"| {r['decode_ms']['p50']} | {late['p50']} | {r['recompiles_after_warmup']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {MODES}")
    if "fast" in modes:  # fast fuses projections in place; the other modes must run before it
        modes = [mode for mode in modes if mode != "fast"] + ["fast"]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    llm, tts = build_decoders(args.preset, device, dtype, args.llm_len, args.tts_len)
    report: dict[str, Any] = {
        "command": "python -m bench.decode_steps " + shlex.join(sys.argv[1:] if argv is None else argv),
        "preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "env": environment(device),
        "llm_len": llm.model.cache_max_len, "tts_len": tts.model.cache_max_len,
        "prefill_tokens": {"llm": args.prefill, "tts": TTS_CONDITION_TOKENS}, "modes": {},
    }
    for mode in modes:
        report["modes"][mode] = run_mode(mode, llm, tts, args, device, dtype)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report) if args.json else markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
