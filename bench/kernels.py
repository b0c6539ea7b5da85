"""Micro-benchmark: each Triton kernel vs its torch reference, eager and torch.compile'd.

    python -m bench.kernels            # markdown table
    python -m bench.kernels --json     # one JSON object on stdout
    python -m bench.kernels --out bench/results/kernels.json
    python -m bench.kernels --kernels gemv,swiglu_gemv   # only these kernels' rows

Shapes come from the presets: LLM (hidden 4096, ffn 12288) and TTS (hidden 768, ffn 3072) at 1, 64
and 1024 rows, bfloat16; decode attention (one query position over a cache slot, all keys visible) at
the presets' head shapes (LLM 32 heads over 8 KV heads, D 128; TTS 12 over 12, D 64) for kv_len 512,
2048 and 8192 (its `rows` is kv_len, `cols` head_dim). Two timings per variant, in microseconds per
call (medians):
- `graph_us`: replay of a CUDA graph of many calls (triton.testing.do_bench_cudagraph), i.e. GPU
  time as the server sees it with CUDA graphs, without Python launch overhead;
- `launch_us`: plain calls (triton.testing.do_bench), Python dispatch and launch included.
The single-row products (`gemv`, `swiglu_gemv`) run at the decode-step weight shapes (`rows` = N,
`cols` = K) against F.linear (cuBLAS), with the weight-read bandwidth of both (`*_gbs`). As in a decode
step, their weights come from memory, not from the 50 MB L2 cache: successive calls cycle through
copies of the weight that together exceed COLD_BYTES.
The decode fusion's kernels (`compile.decode_fusion`) run at the model shapes too: the q/k/v GEMV with
its RMSNorm prologue, the o and down GEMVs with their residual epilogue, and the attention prologue
`qk_norm_rope_cache` (`rows` = heads + 2 x kv_heads, `cols` = head_dim).
`--sweep-gemv` times, instead of the table, every (BLOCK_N, BLOCK_K, num_warps) of a grid at each GEMV
shape, and with the norm prologue (`gemv_norm`) at the q/k/v and gate/up shapes, and reports the fastest
(what `workers/kernels/gemv.py` GEMV_CONFIGS and NORM_CONFIGS should hold); with `--out` the
report is rewritten after every shape (the table's after every case), so a run cut short keeps what it
finished. On an H100 the 18 product and attention-prologue rows took 32 s together, the six decode
attention rows about 38 s each (measured before the reference was compiled apart from the weight-cycling
closure; each case compiles its reference afresh): `--kernels` runs the rows of the named kernels only.
Needs CUDA; elsewhere it prints {"skipped": ...} and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.kernels import (
    add_rms_norm_reference,
    decode_attention_reference,
    rms_norm_reference,
    silu_mul_reference,
)
from workers.kernels._dispatch import triton, triton_runs_on
from workers.kernels.add_rmsnorm import add_rms_norm_op
from workers.kernels.flash_decoding import decode_attention_op
from workers.kernels.gemv import (
    gemv_op,
    gemv_reference,
    launch_gemv,
    swiglu_gemv_op,
    swiglu_gemv_reference,
)
from workers.kernels.rmsnorm import rms_norm_op
from workers.kernels.rope_cache import qk_norm_rope_cache_op, qk_norm_rope_cache_reference
from workers.kernels.swiglu import silu_mul_op
from workers.model.presets import LLMArgs, TTSArgs

ROWS = (1, 64, 1024)
# The table's kernels, in the order they run: the decode-step kernels first, the norms last.
KERNEL_NAMES = ("decode_attention", "gemv", "swiglu_gemv", "gemv_norm", "gemv_residual", "swiglu_gemv_residual",
                "qk_norm_rope_cache", "rms_norm", "add_rms_norm", "silu_mul")
DECODE_KV_LENS = (512, 2048, 8192)
EPS = 1e-6
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Case:
    """One kernel at one shape: the Triton op, its reference, and the inputs both take. A product's weight
    comes last, from `weights` (identical copies, the next one at every call, so that no call finds its
    weight in L2)."""

    kernel: str
    model: str
    rows: int
    cols: int
    triton_fn: Callable[..., object]
    reference_fn: Callable[..., object]
    inputs: tuple[object, ...]
    weights: tuple[torch.Tensor, ...] = ()

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight a product streams per call (0 for the other kernels), for bandwidth."""
        return self.weights[0].numel() * self.weights[0].element_size() if self.weights else 0

    def caller(self, fn: Callable[..., object]) -> Callable[[], object]:
        """fn (the Triton op, the reference or its compiled version) on this case's inputs: what is timed."""
        if not self.weights:
            return lambda: fn(*self.inputs)
        return _cycling(fn, self.inputs, self.weights)


def gemv_shapes() -> list[tuple[str, str, int, int]]:
    """(kernel, model, N, K) of every single-row product of an LLM and a TTS decode step, and the heads."""
    llm, tts = LLMArgs(), TTSArgs()
    shapes = []
    for model, args, head_rows in (("llm", llm, llm.vocab), ("tts", tts, tts.num_audio_tokens)):
        qkv = (args.heads + 2 * args.kv_heads) * args.head_dim
        shapes += [("gemv", model, qkv, args.hidden), ("gemv", model, args.hidden, args.heads * args.head_dim),
                   ("gemv", model, 2 * args.ffn, args.hidden), ("swiglu_gemv", model, args.hidden, args.ffn),
                   ("gemv", model, head_rows, args.hidden)]
    return shapes


def build_cases(device: torch.device, kernels: Collection[str] = KERNEL_NAMES) -> list[Case]:
    """The kernel x model x rows combinations of `kernels` with random bf16 inputs on `device` (the
    products' weight copies only for the kernels asked for)."""
    cases = []
    for model, args in {"llm": LLMArgs(), "tts": TTSArgs()}.items():
        groups = args.heads // args.kv_heads
        for kv_len in DECODE_KV_LENS:
            # Slot 1 of a 2-slot cache, as Attention.forward passes it; the query sees every key.
            cache_shape = (2, 2, args.kv_heads, kv_len, args.head_dim)
            k_cache, v_cache = torch.randn(cache_shape, device=device, dtype=DTYPE)
            q = torch.randn(1, args.kv_heads, groups, args.head_dim, device=device, dtype=DTYPE)
            inputs = (q, k_cache[1:], v_cache[1:], torch.tensor([kv_len - 1], device=device))
            cases.append(Case("decode_attention", model, kv_len, args.head_dim, decode_attention_op,
                              decode_attention_reference, inputs))
    for kernel, model, rows, cols in gemv_shapes():
        if kernel not in kernels:
            continue
        weight = torch.randn(rows, cols, device=device, dtype=DTYPE) / cols**0.5
        width = 2 * cols if kernel == "swiglu_gemv" else cols
        x = torch.randn(1, 1, width, device=device, dtype=DTYPE)
        fns = (swiglu_gemv_op, swiglu_gemv_reference) if kernel == "swiglu_gemv" else (gemv_op, gemv_reference)
        cases.append(Case(kernel, model, rows, cols, *fns, (x,), _weight_copies(weight)))
    # The decode-step kernels first, the norms last: a run cut short keeps what no earlier run measured.
    cases += decode_fusion_cases(device, kernels) + norm_cases(device)
    return [case for case in cases if case.kernel in kernels]


def norm_cases(device: torch.device) -> list[Case]:
    """RMSNorm, residual-add + RMSNorm and SiLU-mul at the models' widths, at every row count of ROWS."""
    cases = []
    models = {"llm": (LLMArgs().hidden, LLMArgs().ffn), "tts": (TTSArgs().hidden, TTSArgs().ffn)}
    for model, (hidden, ffn) in models.items():
        weight = torch.randn(hidden, device=device, dtype=DTYPE)
        for rows in ROWS:
            x = torch.randn(rows, hidden, device=device, dtype=DTYPE)
            residual = torch.randn_like(x)
            gate_up = torch.randn(rows, 2 * ffn, device=device, dtype=DTYPE)
            gate, up = gate_up[:, :ffn], gate_up[:, ffn:]
            cases += [
                Case("rms_norm", model, rows, hidden, rms_norm_op, rms_norm_reference, (x, weight, EPS)),
                Case("add_rms_norm", model, rows, hidden, add_rms_norm_op, add_rms_norm_reference,
                     (x, residual, weight, EPS)),
                Case("silu_mul", model, rows, ffn, silu_mul_op, silu_mul_reference, (gate, up)),
            ]
    return cases


def decode_fusion_cases(device: torch.device, kernels: Collection[str] = KERNEL_NAMES) -> list[Case]:
    """The decode fusion's kernels at the model shapes: the q/k/v product with its RMSNorm prologue, the
    output projection and down projection with their residual epilogue, and the attention prologue
    (q/k norm + RoPE + K/V write into slot 1 of a 2-slot cache of 8192 positions); the products only where
    `kernels` names them."""
    cases = []
    for model, args in {"llm": LLMArgs(), "tts": TTSArgs()}.items():
        qkv_rows = (args.heads + 2 * args.kv_heads) * args.head_dim
        norm = torch.randn(args.hidden, device=device, dtype=DTYPE)
        x, residual = (torch.randn(1, 1, args.hidden, device=device, dtype=DTYPE) for _ in range(2))
        gate_up = torch.randn(1, 1, 2 * args.ffn, device=device, dtype=DTYPE)
        for kernel, rows, cols, fused, reference, x_in, extra in (
            ("gemv_norm", qkv_rows, args.hidden, gemv_op, gemv_reference, x, (norm, EPS)),
            ("gemv_residual", args.hidden, args.heads * args.head_dim, gemv_op, gemv_reference,
             torch.randn(1, 1, args.heads * args.head_dim, device=device, dtype=DTYPE), (None, 0.0, residual)),
            ("swiglu_gemv_residual", args.hidden, args.ffn, swiglu_gemv_op, swiglu_gemv_reference, gate_up,
             (residual,)),
        ):
            if kernel not in kernels:
                continue
            weights = _weight_copies(torch.randn(rows, cols, device=device, dtype=DTYPE) / cols**0.5)
            fns = [lambda x, w, fn=fn, extra=extra: fn(x, w, *extra) for fn in (fused, reference)]
            cases.append(Case(kernel, model, rows, cols, *fns, (x_in,), weights))
        head_dim, kv_heads = args.head_dim, args.kv_heads
        qkv = torch.randn(1, 1, qkv_rows, device=device, dtype=DTYPE)
        qk_norm = model == "llm"  # Qwen3 normalises q and k; the TTS backbone does not
        norms = (torch.ones(head_dim, device=device, dtype=DTYPE),) * 2 if qk_norm else (None, None)
        cos, sin = (torch.randn(1, head_dim // 2, device=device, dtype=DTYPE) for _ in range(2))
        k_cache, v_cache = (torch.zeros(2, kv_heads, 8192, head_dim, device=device, dtype=DTYPE) for _ in range(2))
        inputs = (qkv, *norms, EPS, cos, sin, k_cache, v_cache, 1, torch.tensor([4000], device=device), args.heads)
        cases.append(Case("qk_norm_rope_cache", model, args.heads + 2 * kv_heads, head_dim, qk_norm_rope_cache_op,
                          qk_norm_rope_cache_reference, inputs))
    return cases


GEMV_SWEEP = [(block_n, block_k, warps) for block_n in (1, 2, 4, 8, 16) for block_k in (128, 512, 1024)
              for warps in (4, 8) if block_n * block_k <= 8192]
SWEEP_REP_MS = 10  # graph replays per config: enough for a stable median of a 2-400 µs kernel
COLD_BYTES = 256 * 2**20  # several times the H100's L2 cache


def _weight_copies(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The weight and identical copies, COLD_BYTES in all (at least the weight itself)."""
    count = max(1, -(-COLD_BYTES // (weight.numel() * weight.element_size())))
    return (weight, *(weight.clone() for _ in range(count - 1)))


def _cycling(fn: Callable[..., object], inputs: tuple[object, ...], weights: tuple[torch.Tensor, ...]
             ) -> Callable[[], object]:
    """fn(*inputs, w) for the next of the (identical) weights at every call, so no call finds its weight in
    L2. Not for torch.compile itself (compile `fn`): dynamo never returns from tracing the call counter."""
    calls = itertools.count()

    def call() -> object:
        return fn(*inputs, weights[next(calls) % len(weights)])

    return call


def sweep_gemv(device: torch.device, report: Callable[[list[dict[str, object]]], None]
               ) -> list[dict[str, object]]:
    """Graph-replay time of the GEMV kernel at each model shape for every config of GEMV_SWEEP; `report`
    gets the results so far after every shape."""
    from triton.testing import do_bench_cudagraph

    results: list[dict[str, object]] = []
    # The norm prologue's own rows: the products a fused decode step feeds a normed row (q/k/v, gate/up).
    norm_shapes = [("gemv_norm", model, rows, cols) for kernel, model, rows, cols in gemv_shapes()
                   if kernel == "gemv" and rows > cols and rows not in (LLMArgs().vocab, TTSArgs().num_audio_tokens)]
    for kernel, model, rows, cols in gemv_shapes() + norm_shapes:
        weight = torch.randn(rows, cols, device=device, dtype=DTYPE)
        x = torch.randn((2 if kernel == "swiglu_gemv" else 1) * cols, device=device, dtype=DTYPE)
        swiglu, weights, timings = kernel == "swiglu_gemv", _weight_copies(weight), {}
        norm = torch.randn(cols, device=device, dtype=DTYPE) if kernel == "gemv_norm" else None
        for config in GEMV_SWEEP:
            call = _cycling(lambda x, w, swiglu=swiglu, config=config, norm=norm:
                            launch_gemv(x, w, swiglu, config, norm_weight=norm, eps=EPS), (x,), weights)
            call()
            timings[config] = 1000.0 * do_bench_cudagraph(call, rep=SWEEP_REP_MS, return_mode="median")
        best = min(timings, key=timings.get)
        results.append({"kernel": kernel, "model": model, "rows": rows, "cols": cols, "best": list(best),
                        "best_us": round(timings[best], 2),
                        "best_gbs": round(weight.numel() * 2 / timings[best] / 1e3, 1),
                        "us": {"x".join(map(str, c)): round(t, 2) for c, t in timings.items()}})
        report(results)
    return results


def _as_tuple(output: object) -> tuple[torch.Tensor, ...]:
    return output if isinstance(output, tuple) else (output,)  # type: ignore[return-value]


def _median_us(fn: Callable[[], object]) -> dict[str, float]:
    from triton.testing import do_bench, do_bench_cudagraph  # only reached where triton is installed

    fn()
    torch.cuda.synchronize()
    return {
        "graph_us": 1000.0 * do_bench_cudagraph(fn, return_mode="median"),
        "launch_us": 1000.0 * do_bench(fn, return_mode="median"),
    }


def measure(case: Case) -> dict[str, object]:
    """Timings of the three variants, speed-ups of Triton over each torch variant, and the max error."""
    torch._dynamo.reset()  # a fresh compile per shape, clear of dynamo's per-function recompile limit
    compiled_reference = torch.compile(case.reference_fn, dynamic=False)
    variants = {
        "triton": case.triton_fn,
        "torch_eager": case.reference_fn,
        "torch_compile": compiled_reference,
    }
    timings, wall_s = {}, {}
    for name, fn in variants.items():
        began = time.perf_counter()
        timings[name] = _median_us(case.caller(fn))
        wall_s[name] = round(time.perf_counter() - began, 1)  # what measuring it took (the compile included)
    pairs = zip(_as_tuple(case.caller(case.triton_fn)()), _as_tuple(case.caller(case.reference_fn)()))
    result: dict[str, object] = {
        "kernel": case.kernel, "model": case.model, "rows": case.rows, "cols": case.cols,
        "max_abs_err": max((got.float() - want.float()).abs().max().item() for got, want in pairs),
        "bench_wall_s": wall_s,
    }
    if case.weight_bytes:
        result["triton_gbs"] = round(case.weight_bytes / timings["triton"]["graph_us"] / 1e3, 1)
        result["reference_gbs"] = round(case.weight_bytes / timings["torch_eager"]["graph_us"] / 1e3, 1)
    for kind in ("graph_us", "launch_us"):
        us = {name: round(t[kind], 2) for name, t in timings.items()}
        result[kind] = us
        result[kind.replace("_us", "_speedup")] = {
            "vs_eager": round(us["torch_eager"] / us["triton"], 2),
            "vs_compile": round(us["torch_compile"] / us["triton"], 2),
        }
    return result


def run(sweep: bool = False, write: Callable[[dict[str, object]], None] | None = None,
        kernels: Collection[str] = KERNEL_NAMES) -> dict[str, object]:
    """The table of `kernels` (or, with `sweep`, the GEMV config sweep) as one JSON-ready dict, or
    {"skipped": reason} without CUDA + Triton. `write` gets the report so far after every case (every
    shape of the sweep)."""
    if not torch.cuda.is_available():
        return {"skipped": "CUDA is required: no CUDA device is visible"}
    device = torch.device("cuda")
    if not triton_runs_on(device):
        return {"skipped": "Triton kernels cannot run on CUDA here (triton missing or TRITON_INTERPRET=1)"}
    torch.manual_seed(0)
    write = write or (lambda report: None)
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(DTYPE).removeprefix("torch."),
    }
    if sweep:
        report["gemv_sweep"] = sweep_gemv(device, lambda results: write({**report, "gemv_sweep": results}))
    else:
        results: list[dict[str, object]] = []
        report["kernels"], report["results"] = list(kernels), results
        for case in build_cases(device, kernels):
            results.append(measure(case))
            write(report)
    return report


def markdown_table(report: dict[str, object]) -> str:
    """A readable table of a `run()` report."""
    title = f"{report['device']} - torch {report['torch']}, triton {report['triton']}, {report['dtype']}"
    if "gemv_sweep" in report:
        lines = [title, "", "| kernel | model | rows | cols | best (BLOCK_N, BLOCK_K, warps) | us | GB/s |",
                 "|---|---|---|---|---|---|---|"]
        for r in report["gemv_sweep"]:  # type: ignore[union-attr]
            lines.append(f"| {r['kernel']} | {r['model']} | {r['rows']} | {r['cols']} | {tuple(r['best'])} "
                         f"| {r['best_us']} | {r['best_gbs']} |")
        return "\n".join(lines)
    lines = [
        title,
        "",
        "| kernel | model | rows | cols | triton us (graph) | eager us | compile us | x eager | x compile "
        "| triton us (launch) | eager us | compile us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:  # type: ignore[union-attr]
        g, s, launch = r["graph_us"], r["graph_speedup"], r["launch_us"]
        lines.append(
            f"| {r['kernel']} | {r['model']} | {r['rows']} | {r['cols']} | {g['triton']} | {g['torch_eager']} "
            f"| {g['torch_compile']} | {s['vs_eager']} | {s['vs_compile']} | {launch['triton']} "
            f"| {launch['torch_eager']} | {launch['torch_compile']} |"
        )
    return "\n".join(lines)


def _kernel_names(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = sorted(set(names) - set(KERNEL_NAMES))
    if unknown or not names:
        problem = f"unknown kernel(s) {', '.join(unknown)}" if unknown else "no kernel named"
        raise argparse.ArgumentTypeError(f"{problem}; choose from {', '.join(KERNEL_NAMES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--sweep-gemv", action="store_true",
                        help="time the GEMV kernel's config grid instead of the kernel table")
    parser.add_argument("--kernels", type=_kernel_names, default=KERNEL_NAMES,
                        help=f"comma-separated kernels of the table (default all: {','.join(KERNEL_NAMES)})")
    args = parser.parse_args(argv)
    if args.sweep_gemv and args.kernels != KERNEL_NAMES:
        parser.error("--kernels selects rows of the kernel table; --sweep-gemv sweeps the GEMV shapes")

    def write(report: dict[str, object]) -> None:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    report = run(args.sweep_gemv, write, args.kernels)
    write(report)
    if args.json or "skipped" in report:
        print(json.dumps(report))
    else:
        print(markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
