"""Where the time of a `fast`-mode duplex unit goes: wall-clock timings per component and kernel tables.

    python -m bench.profile_unit --preset minicpm-o-4.5 --out bench/results/profile_h100.json

Builds one engine in `fast` mode (random weights, forced schedule), warms it up with one forced cycle, then
measures each component on its own, `--repeats` times (median): the LLM decode step and a 16-token prefill
(the runner's captured graphs), the LM head plus the decode rule (captured, and eagerly for comparison), a
decode step then the head (two calls) against the token step doing both (one call), a TTS decode step plus
code sampling, a forced unit's 25 TTS codes one step at a time against the token steps, one vision slice,
one second of audio, and token2wav on 25 codes. A torch.profiler pass over one speak
unit (graphs included) and one over a few uncaptured LLM decode steps give the top kernels by GPU time.
Prints one JSON object; `--out` also writes it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from bench.duplex import SYSTEM_PROMPT, accelerate
from common.config import ServiceConfig, SessionSettings
from workers.compile import configure_compile_cache
from workers.engine.decoding import choose_token
from workers.engine.engine import DuplexEngine
from workers.media import load_media
from workers.model.image import slice_image
from workers.model.tts import CodeStepper, CodeSteps

KERNEL_ROWS = 25


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of fn(), each call started on an idle device and timed to its end."""
    times = []
    for _ in range(repeats):
        _synchronize()
        began = time.perf_counter()
        fn()
        _synchronize()
        times.append((time.perf_counter() - began) * 1000.0)
    return statistics.median(times)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_table(fn: Callable[[], object]) -> str:
    """The top kernels of fn() by total GPU time (torch.profiler)."""
    _synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        _synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=KERNEL_ROWS, max_name_column_width=70)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_unit", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="minicpm-o-4.5")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--fast-compile", default="vpm,resampler,token2wav")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--mp4", default="assets/warmup.mp4")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    configure_compile_cache("torch_compile_cache")
    cfg = ServiceConfig.model_validate({  # slot 0: the profiled session; slot 1: the components alone
        "model": {"preset": args.preset, "device": args.device, "acceleration": "fast"},
        "service": {"sessions_per_worker": 2},
    })
    engine = DuplexEngine(cfg)
    accelerate(engine, "fast", [m for m in args.fast_compile.split(",") if m])
    clip = load_media(args.mp4)
    chunks = [np.pad(c, (0, 16_000 - c.size)) for c in clip.audio_chunks]
    frames = [clip.frame_images(i) for i in range(len(chunks))]
    session = engine.new_session("profile", schedule="forced")
    session.prepare(SYSTEM_PROMPT, SessionSettings(seed=0), None, None)

    def run_unit(index: int) -> None:
        session.push_audio(chunks[index % len(chunks)])
        session.run_unit(frames[index % len(frames)], max_slice_nums=1)
        session.finalize()

    for index in range(8):  # one forced cycle: listen x3, speak x5
        run_unit(index)
    model, llm_runner, tts_runner = engine.model, engine.llm_runner, engine.tts_runner
    hidden = model.args.llm.hidden
    x1 = torch.randn(1, 1, hidden, device=engine.device, dtype=model.llm_dtype)
    x16 = torch.randn(1, 16, hidden, device=engine.device, dtype=model.llm_dtype)
    position = session.position + 64
    last = torch.randn(1, hidden, device=engine.device, dtype=model.llm_dtype)
    recent = list(range(1000, 1100))
    rule = engine.heads.reset_rule(1, session.params)  # slot 1's rule state, with a window of 100 ids
    rule.ring[:len(recent)] = torch.tensor(recent, device=engine.device)
    rule.uniforms.uniform_()
    tts_hidden = model.args.tts.hidden
    t1 = torch.randn(1, 1, tts_hidden, device=engine.device, dtype=model.llm_dtype)
    image = slice_image(frames[0][0], 1, model.args.vision)
    stream = engine.token2wav.new_stream(None, slot=1)
    audio = session.audio_encoder

    def logits_and_rule(hidden_last: torch.Tensor = last) -> None:
        """The captured LM head + rule on post-norm hidden [1, H]."""
        int(engine.heads.llm(hidden_last, rule.settings[0], rule.ring, rule.uniforms[0]))

    def logits_and_rule_eager() -> None:
        choose_token(engine.logits(last), session.params, recent, engine.forbidden_mask, None,
                     uniforms=rule.uniforms[0])

    def llm_step_then_rule() -> None:  # what one token step replaces: the runner's step, then the head's call
        hidden = llm_runner(engine.model.llm.embed(torch.tensor([1000], device=engine.device)), position, 1)
        logits_and_rule(hidden[:, -1])

    def llm_token_step() -> None:
        engine.llm_steps(1, 1000, position, 0, 1000, False, 0)

    tts_settings = torch.tensor([0.8, 1.05, 0.0], device=engine.device)
    tts_recent = torch.full((16,), -1, dtype=torch.long, device=engine.device)
    tts_uniform = torch.rand(1, device=engine.device)
    condition = model.tts.build_condition(torch.arange(100, 112, device=engine.device),
                                          torch.randn(12, model.args.tts.llm_dim, device=engine.device))

    def tts_sample() -> None:
        int(engine.heads.tts(t1[:, -1], tts_settings, tts_recent, tts_uniform))

    def tts_codes(steps: CodeStepper) -> Callable[[], object]:
        """A forced unit's code loop: prefill a 13-row condition, then 25 codes."""
        return lambda: model.tts.generate_codes(condition, 1, 0, 0.8, 25, 25, None, backbone=tts_runner, steps=steps)

    def token2wav_25() -> None:
        stream.push(list(range(100, 125)))

    components = {
        "llm_decode_step": lambda: llm_runner(x1, position, 1),
        "llm_prefill_16": lambda: llm_runner(x16, position, 1),
        "llm_head_and_rule": logits_and_rule,
        "llm_head_and_rule_eager": logits_and_rule_eager,
        "llm_step_then_head_and_rule": llm_step_then_rule,
        "tts_decode_step": lambda: tts_runner(t1, 40, 1),
        "tts_head_and_sample": tts_sample,
        "tts_25_codes_one_at_a_time": tts_codes(CodeSteps(model.tts, tts_runner, engine.heads.tts)),
        "vision_slice": lambda: model.encode_images(image),
        "audio_second": lambda: audio.feed(chunks[1]),
        "token2wav_25_codes": token2wav_25,
    }
    if engine.llm_steps is not None and engine.tts_steps is not None:  # compile.token_steps
        components.update(llm_token_step=llm_token_step, tts_25_codes_token_steps=tts_codes(engine.tts_steps))
    timings = {name: median_ms(fn, args.repeats) for name, fn in components.items()}

    speak_index = 8 + 3  # the next cycle's first speaking unit
    for index in range(8, speak_index):
        run_unit(index)
    speak_table = kernel_table(lambda: run_unit(speak_index))
    kv_len = llm_runner.decode_kv_len(position)

    def uncaptured_steps() -> None:
        llm_runner._start.fill_(position)
        with llm_runner.kernel_switches():
            for _ in range(5):
                llm_runner._step(0, 1, kv_len)
        logits_and_rule()

    uncaptured_steps()
    step_table = kernel_table(uncaptured_steps)
    report = {
        "benchmark": "profile_unit",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "preset": args.preset,
        "component_ms": timings,
        "speak_unit_kernels": speak_table,
        "llm_uncaptured_5_steps_kernels": step_table,
        "command": "python -m bench.profile_unit " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("kernels")}, indent=2))
    print(speak_table)
    print(step_table)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
