"""Triton kernels vs their torch references, the on/off switch, the custom ops under torch.compile.

The Triton interpreter is chosen when the kernels are defined (TRITON_INTERPRET=1 before import),
so the CPU kernel checks run in one child process (`python -m tests.test_kernels`) that reports a
JSON verdict per case; this process never sees the interpreter. On CUDA the same checks run natively.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import workers.kernels as kernels
from workers.kernels._dispatch import row_block_and_warps, use_triton
from workers.kernels.add_rmsnorm import add_rms_norm_op
from workers.kernels.flash_decoding import decode_attention_op, split_len
from workers.kernels.gemv import gemv_op, swiglu_gemv_op
from workers.kernels.rmsnorm import rms_norm_op
from workers.kernels.rope_cache import qk_norm_rope_cache_op
from workers.kernels.swiglu import silu_mul_op
from workers.model.layers import linear

REPO_ROOT = Path(__file__).resolve().parent.parent
EPS = 1e-6
TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 5e-2}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclass(frozen=True)
class KernelCase:
    """One public kernel function on one input shape, dtype and memory layout.

    decode_attention: shape is (kv_heads, groups, kv_len, head_dim), `position` the query position, and
    keys/values are slot 1 of a 2-slot cache, as the model passes them.
    gemv / swiglu_gemv: shape is the weight's (N, K); x is one row [1, 1, K] (gate/up [1, 1, 2K]).
    """

    kernel: str  # rms_norm | add_rms_norm | silu_mul | silu_mul_fused | decode_attention | gemv | swiglu_gemv
    shape: tuple[int, ...]
    dtype: str
    layout: str = "contiguous"  # contiguous | row_strided (rows padded) | transposed (last dim strided)
    position: int = 0

    @property
    def id(self) -> str:
        where = f"-pos{self.position}" if self.kernel == "decode_attention" else ""
        return f"{self.kernel}-{'x'.join(map(str, self.shape))}-{self.dtype}-{self.layout}{where}"


def _decode_attention_cases(shapes: list[tuple[int, int, int]], kv_len_positions: list[tuple[int, int]],
                            dtype: str) -> list[KernelCase]:
    return [
        KernelCase("decode_attention", (kv_heads, groups, kv_len, head_dim), dtype, "cache_view", position)
        for kv_heads, groups, head_dim in shapes
        for kv_len, position in kv_len_positions
    ]


LLM_ATTENTION = (8, 4, 128)  # Qwen3-8B: 32 query heads over 8 KV heads
TTS_ATTENTION = (16, 1, 64)
# kv_len, position: one key; a tail; a whole 512 bucket; positions well inside (later keys masked).
DECODE_POSITIONS = [(1, 0), (7, 3), (512, 511), (1000, 617), (2048, 1300)]
# The interpreter costs 0.5-2 s per long case: all positions in bf16 (the served dtype), a few elsewhere.
DECODE_INTERPRETER_CASES = (
    _decode_attention_cases([LLM_ATTENTION], DECODE_POSITIONS, "bfloat16")
    + _decode_attention_cases([TTS_ATTENTION], [(1, 0), (7, 3), (1000, 617)], "bfloat16")
    + _decode_attention_cases([LLM_ATTENTION], [(512, 200)], "float32")
    + _decode_attention_cases([LLM_ATTENTION], [(1000, 999)], "float16")
    + _decode_attention_cases([LLM_ATTENTION, TTS_ATTENTION], [(7, 3)], "float32")
    + _decode_attention_cases([LLM_ATTENTION, TTS_ATTENTION], [(7, 6)], "float16")
)


# Weight shapes (N, K): ragged N and K (masked tiles), a K shorter than one tile, a tall thin matrix.
GEMV_INTERPRETER_CASES = [
    KernelCase(kernel, shape, dtype)
    for kernel in ("gemv", "swiglu_gemv")
    for shape in ((13, 100), (64, 768), (300, 40))
    for dtype in TOLERANCE
] + [
    # The fused prologue (RMSNorm of x) and epilogue (residual add) of a decode step's products.
    KernelCase(kernel, shape, dtype)
    for kernel in ("gemv_norm", "gemv_residual", "gemv_norm_residual", "swiglu_gemv_residual")
    for shape in ((13, 100), (64, 768))
    for dtype in TOLERANCE
]
# qk_norm_rope_cache: shape (heads, kv_heads, head_dim); layout "qk_norm" (Qwen3) or "no_norm" (the TTS).
ROPE_CACHE_SHAPES = [((4, 2, 16), "qk_norm"), ((32, 8, 128), "qk_norm"), ((12, 12, 64), "no_norm")]
ROPE_CACHE_CASES = [KernelCase("qk_norm_rope_cache", shape, dtype, layout)
                    for shape, layout in ROPE_CACHE_SHAPES for dtype in TOLERANCE]
# The model's decode-step products (LLM qkv, o, gate/up, down, LM head; TTS qkv, o, gate/up, down).
GEMV_MODEL_SHAPES = [(6144, 4096), (4096, 4096), (24576, 4096), (151748, 4096), (2304, 768), (768, 768),
                     (6144, 768)]
SWIGLU_GEMV_MODEL_SHAPES = [(4096, 12288), (768, 3072)]


def _cases_for_dtype(dtype: str) -> list[KernelCase]:
    # 1 row, non-power-of-2 hidden, many rows, 3-D.
    shapes = [(1, 64), (7, 100), (130, 96), (2, 3, 200)]
    return [KernelCase(kernel, shape, dtype) for kernel in ("rms_norm", "add_rms_norm", "silu_mul") for shape in shapes] + [
        KernelCase("silu_mul_fused", (2, 3, 96), dtype)
    ]


INTERPRETER_CASES = [case for dtype in TOLERANCE for case in _cases_for_dtype(dtype)] + [
    KernelCase("rms_norm", (1, 12288), "float32"),
    KernelCase("add_rms_norm", (2, 4096), "bfloat16"),
    KernelCase("silu_mul", (1, 12288), "bfloat16"),
    KernelCase("rms_norm", (6, 100), "float16", "row_strided"),
    KernelCase("add_rms_norm", (2, 5, 64), "float32", "transposed"),
    KernelCase("silu_mul", (3, 4, 100), "bfloat16", "row_strided"),
    *DECODE_INTERPRETER_CASES,
    *GEMV_INTERPRETER_CASES,
    *ROPE_CACHE_CASES,
]
LARGE_ROW_KERNELS = (("rms_norm", 4096), ("add_rms_norm", 4096), ("add_rms_norm", 768), ("silu_mul", 12288))
CUDA_CASES = (
    INTERPRETER_CASES
    + [KernelCase(kernel, (rows, hidden), "bfloat16") for kernel, hidden in LARGE_ROW_KERNELS
       for rows in (1, 64, 1024)]
    + _decode_attention_cases([LLM_ATTENTION, TTS_ATTENTION], DECODE_POSITIONS, "float32")
    + _decode_attention_cases([LLM_ATTENTION, TTS_ATTENTION], DECODE_POSITIONS, "float16")
    + _decode_attention_cases([LLM_ATTENTION, TTS_ATTENTION, (12, 1, 64), (2, 2, 32)],
                              [(4096, 4000), (8192, 5000), (40960, 40959)], "bfloat16")
    + [KernelCase("gemv", shape, "bfloat16") for shape in GEMV_MODEL_SHAPES]
    + [KernelCase("swiglu_gemv", shape, "bfloat16") for shape in SWIGLU_GEMV_MODEL_SHAPES]
    # as the fused decode step uses them: norm into q/k/v and gate/up, residual into o and down
    + [KernelCase("gemv_norm", shape, "bfloat16") for shape in ((6144, 4096), (24576, 4096), (2304, 768), (6144, 768))]
    + [KernelCase("gemv_residual", shape, "bfloat16") for shape in ((4096, 4096), (768, 768))]
    + [KernelCase("swiglu_gemv_residual", shape, "bfloat16") for shape in SWIGLU_GEMV_MODEL_SHAPES]
)


def _make_tensor(shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: str) -> torch.Tensor:
    if layout == "row_strided":
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)[..., : shape[-1]]
    if layout == "transposed":
        return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype, device=device).transpose(-1, -2)
    return torch.randn(shape, dtype=dtype, device=device)


def _decode_attention_inputs(
    case: KernelCase, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, keys, values (views of slot 1 of a 2-slot cache one tile longer than kv_len) and the position."""
    kv_heads, groups, kv_len, head_dim = case.shape
    dtype = getattr(torch, case.dtype)
    k_cache, v_cache = torch.randn(2, 2, kv_heads, kv_len + 64, head_dim, dtype=dtype, device=device)
    keys, values = k_cache[1, :, :kv_len].unsqueeze(0), v_cache[1, :, :kv_len].unsqueeze(0)
    q = torch.randn(1, kv_heads, groups, head_dim, dtype=dtype, device=device)
    return q, keys, values, torch.tensor([case.position], device=device)


def check_case(case: KernelCase, device: str) -> str | None:
    """Run the public function and its reference; None when they agree, else why not."""
    torch.manual_seed(0)
    if case.kernel == "decode_attention":
        inputs = _decode_attention_inputs(case, device)
        got, want = kernels.decode_attention(*inputs), kernels.decode_attention_reference(*inputs)
        taken = use_triton(inputs[0]) and kernels.DECODE_ATTENTION.is_on()
        return _compare(case, got, want, taken)
    if "gemv" in case.kernel:
        return _check_gemv(case, device)
    if case.kernel == "qk_norm_rope_cache":
        return _check_rope_cache(case, device)
    dtype = getattr(torch, case.dtype)
    x = _make_tensor(case.shape, dtype, case.layout, device)
    hidden = case.shape[-1]
    weight = torch.randn(hidden, dtype=dtype, device=device)
    if case.kernel == "rms_norm":
        got, want = kernels.rms_norm(x, weight, EPS), kernels.rms_norm_reference(x, weight, EPS)
    elif case.kernel == "add_rms_norm":
        residual = _make_tensor(case.shape, dtype, case.layout, device)
        got = kernels.add_rms_norm(x, residual, weight, EPS)
        want = kernels.add_rms_norm_reference(x, residual, weight, EPS)
    elif case.kernel == "silu_mul":
        up = _make_tensor(case.shape, dtype, case.layout, device)
        got, want = kernels.silu_mul(x, up), kernels.silu_mul_reference(x, up)
    else:
        fused = torch.randn(*case.shape[:-1], 2 * hidden, dtype=dtype, device=device)
        got = kernels.silu_mul(fused)
        want = kernels.silu_mul_reference(fused[..., :hidden], fused[..., hidden:])
    return _compare(case, got, want, use_triton(x))


def _check_gemv(case: KernelCase, device: str) -> str | None:
    """One row against a weight of case.shape scaled so outputs are O(1) (the tolerance is absolute);
    `_norm` / `_residual` in the kernel name add the RMSNorm prologue / residual epilogue."""
    dtype = getattr(torch, case.dtype)
    rows, cols = case.shape
    weight = (torch.randn(rows, cols, device=device) / cols**0.5).to(dtype)
    residual = torch.randn(1, 1, rows, dtype=dtype, device=device) if "residual" in case.kernel else None
    if case.kernel.startswith("swiglu_gemv"):
        x = torch.randn(1, 1, 2 * cols, dtype=dtype, device=device)
        got = kernels.swiglu_gemv(x, weight, residual)
        want = kernels.swiglu_gemv_reference(x, weight, residual)
    else:
        x = 3.0 * torch.randn(1, 1, cols, dtype=dtype, device=device)  # not unit RMS: the norm must act
        norm = (1.0 + 0.5 * torch.randn(cols, device=device)).to(dtype) if "norm" in case.kernel else None
        got = kernels.gemv(x, weight, norm, EPS, residual)
        want = kernels.gemv_reference(x, weight, norm, EPS, residual)
    return _compare(case, got, want, kernels.use_gemv(x))


def _check_rope_cache(case: KernelCase, device: str) -> str | None:
    """Queries and both whole caches (slot 1 of 2, position 13 of 20 written; the rest must stay) against
    the reference applied to copies."""
    dtype = getattr(torch, case.dtype)
    heads, kv_heads, head_dim = case.shape
    qkv = 2.0 * torch.randn(1, 1, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    norms = [(1.0 + 0.3 * torch.randn(head_dim, device=device)).to(dtype) for _ in range(2)]
    norms = norms if case.layout == "qk_norm" else [None, None]
    cos, sin = (torch.randn(1, head_dim // 2, dtype=dtype, device=device) for _ in range(2))
    caches = [torch.randn(2, kv_heads, 20, head_dim, dtype=dtype, device=device) for _ in range(2)]
    expected_caches = [cache.clone() for cache in caches]
    position = torch.tensor([13], device=device)
    got = kernels.qk_norm_rope_cache(qkv, *norms, EPS, cos, sin, *caches, 1, position, heads)
    want = kernels.qk_norm_rope_cache_reference(qkv, *norms, EPS, cos, sin, *expected_caches, 1, position, heads)
    return _compare(case, (got, *caches), (want, *expected_caches), kernels.use_decode_fusion(qkv))


def _compare(case: KernelCase, got: object, want: object, triton_taken: bool) -> str | None:
    if not triton_taken:
        return "the Triton path was not taken"
    tolerance = TOLERANCE[case.dtype]
    try:
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    except AssertionError as mismatch:
        return str(mismatch)
    return None


def _omni_ops_traced(fn, *args) -> list[str]:
    """Names of the omni:: custom ops in the graph that make_fx records for fn(*args)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(fn)(*args).graph
    return sorted({str(node.target) for node in graph.nodes if str(node.target).startswith("omni.")})


def _omni_op_counts(fn, *args) -> dict[str, int]:
    """How often each omni:: custom op appears in the graph that make_fx records for fn(*args)."""
    from collections import Counter

    from torch.fx.experimental.proxy_tensor import make_fx

    targets = (str(node.target) for node in make_fx(fn)(*args).graph.nodes)
    return dict(Counter(target for target in targets if target.startswith("omni.")))


def interpreter_report() -> dict[str, object]:
    """What the child process prints: a verdict per case, and the ops traced with the switch on and off."""
    kernels.set_interpret(True)
    x = torch.randn(2, 64)
    weight = torch.randn(64)

    def block(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        normed, residual = kernels.add_rms_norm(x, x, weight, EPS)
        return kernels.rms_norm(kernels.silu_mul(normed, residual), weight, EPS)

    traced = {}
    for enabled in (True, False):
        kernels.TRITON_KERNELS.set(enabled)
        traced["enabled" if enabled else "disabled"] = _omni_ops_traced(block, x, weight)
    kernels.TRITON_KERNELS.set(True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    compiled_equals_eager = torch.equal(compiled(x, weight), block(x, weight))

    attention_inputs = _decode_attention_inputs(KernelCase("decode_attention", (2, 4, 100, 32), "float32",
                                                           position=70), "cpu")
    traced_attention = {}
    traced_gemv = {}
    row, matrix = torch.randn(1, 1, 64), torch.randn(32, 64)
    for triton_on, own_switch_on in ((True, True), (True, False), (False, True)):
        kernels.TRITON_KERNELS.set(triton_on)
        kernels.DECODE_ATTENTION.set(own_switch_on)
        kernels.GEMV.set(own_switch_on)
        key = f"kernels_{'on' if triton_on else 'off'}-own_{'on' if own_switch_on else 'off'}"
        traced_attention[key] = _omni_ops_traced(kernels.decode_attention, *attention_inputs)
        traced_gemv[key] = _omni_ops_traced(lambda x, weight: linear(x, weight), row, matrix)
    for switch in (kernels.TRITON_KERNELS, kernels.DECODE_ATTENTION, kernels.GEMV):
        switch.set(True)
    compiled_attention = torch.compile(
        kernels.decode_attention, fullgraph=True, dynamic=True, backend="aot_eager"
    )
    attention_compiled_equals_eager = torch.equal(
        compiled_attention(*attention_inputs), kernels.decode_attention(*attention_inputs)
    )
    fused_layer = _fused_decode_layer_report()
    kernels.DECODE_FUSION.set(True)  # the qk_norm_rope_cache cases check that the fused path is on
    return {
        **fused_layer,
        "cases": {case.id: check_case(case, "cpu") for case in INTERPRETER_CASES},
        "traced_ops": traced,
        "traced_decode_attention": traced_attention,
        "traced_gemv": traced_gemv,
        "compiled_equals_eager": compiled_equals_eager,
        "decode_attention_compiled_equals_eager": attention_compiled_equals_eager,
    }


CACHE_POSITIONS = 37  # the fused-layer check's cache length: no other tensor there has its sizes


def _fused_decode_layer_report() -> dict[str, object]:
    """One decode step of a small fp32 decoder layer (fused projections, q/k norms, a filled cache) with
    the decode fusion on and off, all kernels interpreted, each from the same cache: the omni ops each
    traces, the largest differences of the outputs and of the whole caches, and the fused step compiled
    by Inductor (its result, and whether its code loops over a whole cache slot: a copy of the cache)."""
    from torch._inductor.utils import run_and_get_code

    from workers.engine.runners import _call_layer
    from workers.model.layers import DecoderLayer, KVCache

    torch.manual_seed(3)
    layer = DecoderLayer(hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96, eps=EPS, qk_norm=True)
    cache = layer.self_attn.kv_cache = KVCache(2, 2, CACHE_POSITIONS, 16, "cpu", torch.float32)
    for parameter in layer.parameters():
        parameter.data.normal_(0.0, 0.3)
    initial = [torch.randn_like(cache.k_cache), torch.randn_like(cache.v_cache)]
    layer.self_attn.fuse_projections()
    layer.mlp.fuse_projections()
    x, position = 2.0 * torch.randn(1, 1, 64), torch.tensor([9])
    cos, sin = torch.randn(1, 8), torch.randn(1, 8)
    for switch in (kernels.TRITON_KERNELS, kernels.DECODE_ATTENTION, kernels.GEMV):
        switch.set(True)

    def step(fused: bool, call=layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kernels.DECODE_FUSION.set(fused)
        cache.k_cache.copy_(initial[0])
        cache.v_cache.copy_(initial[1])
        return call(x, cos, sin, position, 1, 16), cache.k_cache.clone(), cache.v_cache.clone()

    with torch.no_grad():
        results = {fused: step(fused) for fused in (True, False)}
        traced = {}
        for fused in (True, False):
            kernels.DECODE_FUSION.set(fused)
            traced["fused" if fused else "unfused"] = _omni_op_counts(
                lambda x: layer(x, cos, sin, position, 1, 16), x)
        compiled = torch.compile(_call_layer, fullgraph=True, dynamic=True)
        kernels.DECODE_FUSION.set(True)
        cache.k_cache.copy_(initial[0])
        cache.v_cache.copy_(initial[1])
        output, sources = run_and_get_code(compiled, layer, x, cos, sin, position, 1, 16)
        compiled_result = (output, cache.k_cache.clone(), cache.v_cache.clone())
    kernels.DECODE_FUSION.set(False)
    # A loop over the cache's positions, flat or not (a decode step loops over kv_len = 16 of them at most).
    bounds = "|".join(str(CACHE_POSITIONS * inner) for inner in (1, 16, 2 * 16, 2 * 2 * 16))
    loops = re.findall(rf"<static_cast<int64_t>\(({bounds})L\)", "\n".join(sources))

    def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> list[float]:
        return [(p - q).abs().max().item() for p, q in zip(a, b)]

    return {
        "fused_layer_ops": traced,
        "fused_layer_output_scale": results[False][0].abs().max().item(),
        "fused_layer_max_diffs": max_diff(results[True], results[False]),
        "fused_layer_wrote_the_cache": max_diff(results[False][1:], initial),
        "fused_layer_compiled_max_diffs": max_diff(compiled_result, results[True]),
        "fused_layer_compiled_cache_loops": loops,
        "fused_layer_compiled_code_chars": sum(len(source) for source in sources),
    }


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, object]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    for switch in (kernels.TRITON_KERNELS, kernels.DECODE_ATTENTION, kernels.GEMV, kernels.DECODE_FUSION):
        env.pop(switch.env, None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_kernels"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def switch_on():
    """All kernel switches on for the test, the previous state restored after."""
    switches = (kernels.TRITON_KERNELS, kernels.DECODE_ATTENTION, kernels.GEMV, kernels.DECODE_FUSION)
    previous = [switch.is_on() for switch in switches]
    for switch in switches:
        switch.set(True)
    yield
    for switch, on in zip(switches, previous):
        switch.set(on)


@pytest.mark.slow
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda case: case.id)
def test_kernel_matches_reference_in_interpreter(interpreter_results, case):
    # Note: the interpreter converts float32 -> bfloat16 by truncation (CUDA rounds to nearest), so
    # bf16 results may differ from the reference by one ulp here; the tolerance covers it.
    assert interpreter_results["cases"][case.id] is None, interpreter_results["cases"][case.id]


@pytest.mark.slow
def test_switch_selects_custom_ops_or_reference(interpreter_results):
    traced = interpreter_results["traced_ops"]
    assert traced["enabled"] == ["omni.add_rms_norm.default", "omni.rms_norm.default", "omni.silu_mul.default"]
    assert traced["disabled"] == []


@pytest.mark.slow
def test_decode_attention_needs_both_switches(interpreter_results):
    assert interpreter_results["traced_decode_attention"] == {
        "kernels_on-own_on": ["omni.decode_attention.default"],
        "kernels_on-own_off": [],
        "kernels_off-own_on": [],
    }


@pytest.mark.slow
def test_gemv_needs_both_switches(interpreter_results):
    assert interpreter_results["traced_gemv"] == {
        "kernels_on-own_on": ["omni.gemv.default"],
        "kernels_on-own_off": [],
        "kernels_off-own_on": [],
    }


@pytest.mark.slow
def test_fused_decode_layer_folds_norms_and_adds_into_the_products(interpreter_results):
    ops = interpreter_results["fused_layer_ops"]
    products = {"omni.gemv.default": 3, "omni.swiglu_gemv.default": 1, "omni.decode_attention.default": 1}
    # Unfused: the input norm, q/k norms and the add + norm around the products (and inline rotations and
    # cache writes); fused: one prologue kernel for q/k norms, rotations and the K/V write.
    assert ops["unfused"] == {**products, "omni.rms_norm.default": 3, "omni.add_rms_norm.default": 1}
    assert ops["fused"] == {**products, "omni.qk_norm_rope_cache.default": 1}
    scale = interpreter_results["fused_layer_output_scale"]
    output_diff, keys_diff, values_diff = interpreter_results["fused_layer_max_diffs"]
    assert scale > 1.0 and output_diff <= 1e-5 * scale
    assert keys_diff <= 1e-5 and values_diff == 0.0
    assert min(interpreter_results["fused_layer_wrote_the_cache"]) > 0.1  # the step did write K and V


@pytest.mark.slow
def test_compiled_fused_decode_layer_writes_the_cache_in_place(interpreter_results):
    """Inductor keeps the fused prologue's in-place cache write: no copy of a whole cache slot appears in
    its code (a functionalised mutation that is not re-inplaced would clone the cache every step)."""
    assert interpreter_results["fused_layer_compiled_code_chars"] > 1000
    assert interpreter_results["fused_layer_compiled_cache_loops"] == []
    output_diff, keys_diff, values_diff = interpreter_results["fused_layer_compiled_max_diffs"]
    assert output_diff <= 1e-4 and keys_diff <= 1e-5 and values_diff == 0.0


@pytest.mark.slow
def test_dispatch_traces_into_one_compiled_graph_with_kernels_on(interpreter_results):
    assert interpreter_results["compiled_equals_eager"] is True
    assert interpreter_results["decode_attention_compiled_equals_eager"] is True


def test_decode_step_kernels_are_on_in_the_config_and_off_outside_the_runners():
    from common.config import CompileConfig

    config = CompileConfig()
    assert config.triton_kernels and config.decode_attention_kernel and config.gemv_kernel and config.decode_fusion
    for switch in (kernels.DECODE_ATTENTION, kernels.GEMV, kernels.DECODE_FUSION):
        if switch.env not in os.environ:
            assert not switch.is_on()


@pytest.mark.slow
def test_environment_override_wins_over_set_enabled():
    script = (
        "import torch, workers.kernels as k; from workers.kernels._dispatch import use_triton\n"
        "k.set_interpret(True); k.TRITON_KERNELS.set(True); k.DECODE_ATTENTION.set(False)\n"
        "print(k.TRITON_KERNELS.is_on(), use_triton(torch.zeros(1, 64)), k.DECODE_ATTENTION.is_on())"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", kernels.TRITON_KERNELS.env: "0",
           kernels.DECODE_ATTENTION.env: "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["False", "False", "True"]


@pytest.mark.slow
def test_package_works_without_triton_installed():
    script = (
        "import sys; sys.modules['triton'] = None  # makes `import triton` raise ImportError\n"
        "import torch, workers.kernels as k\n"
        "x, w = torch.randn(2, 64), torch.randn(64)\n"
        "assert torch.equal(k.rms_norm(x, w, 1e-6), k.rms_norm_reference(x, w, 1e-6))\n"
        "assert torch.equal(torch.ops.omni.silu_mul(x, x), k.silu_mul_reference(x, x))\n"
        "print(k._dispatch.triton is None)"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["True"]


def test_cpu_without_interpreter_uses_reference(switch_on):
    x = torch.randn(3, 100, dtype=torch.bfloat16)
    weight = torch.randn(100, dtype=torch.bfloat16)
    assert not use_triton(x)
    assert torch.equal(kernels.rms_norm(x, weight, EPS), kernels.rms_norm_reference(x, weight, EPS))
    assert _omni_ops_traced(lambda x, w: kernels.rms_norm(x, w, EPS), x, weight) == []
    row, matrix = x[:1], torch.randn(8, 100, dtype=torch.bfloat16)
    assert not kernels.use_gemv(row)
    assert torch.equal(linear(row, matrix), kernels.gemv_reference(row, matrix))


def test_block_size_is_next_power_of_two_with_more_warps_for_long_rows():
    assert row_block_and_warps(64) == (64, 4)
    assert row_block_and_warps(100) == (128, 4)
    assert row_block_and_warps(768) == (1024, 4)
    assert row_block_and_warps(4096) == (4096, 8)
    assert row_block_and_warps(12288) == (16384, 16)
    with pytest.raises(ValueError, match="65536"):
        row_block_and_warps(65537)


def test_invalid_arguments_are_rejected():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="does not match"):
        kernels.gemv(x[:1], torch.randn(8, 32))
    with pytest.raises(ValueError, match="does not match"):
        kernels.swiglu_gemv(x[:1], torch.randn(8, 64))
    with pytest.raises(ValueError, match="hidden size 64"):
        kernels.rms_norm(x, torch.randn(32), EPS)
    with pytest.raises(ValueError, match="must match"):
        kernels.add_rms_norm(x, torch.randn(2, 64, dtype=torch.float16), torch.randn(64), EPS)
    with pytest.raises(ValueError, match="even last dim"):
        kernels.silu_mul(torch.randn(2, 63))
    with pytest.raises(ValueError, match="must match"):
        kernels.silu_mul(x, torch.randn(2, 32))
    q, cache = torch.randn(1, 2, 4, 32), torch.randn(1, 2, 10, 32)
    with pytest.raises(ValueError, match="kv_heads, groups"):
        kernels.decode_attention(q[0], cache, cache, torch.tensor([3]))
    with pytest.raises(ValueError, match="kv_len"):
        kernels.decode_attention(q, cache[:, :1], cache[:, :1], torch.tensor([3]))
    with pytest.raises(ValueError, match="kv_len"):
        kernels.decode_attention(q, cache, cache.half(), torch.tensor([3]))
    with pytest.raises(ValueError, match="one position"):
        kernels.decode_attention(q, cache, cache, torch.tensor([3, 4]))


@pytest.mark.parametrize(
    ("kv_len", "kv_heads", "keys_per_split"),
    [(1, 8, 64), (512, 8, 64), (2048, 8, 64), (4096, 8, 128), (8192, 8, 256), (40960, 8, 2048),
     (40960, 1, 1024), (4096, 16, 256)],
)
def test_decode_attention_split_length(kv_len, kv_heads, keys_per_split):
    assert split_len(kv_len, kv_heads) == keys_per_split


def test_decode_attention_reference_matches_sdpa_with_the_causal_mask():
    torch.manual_seed(0)
    q, keys, values, position = _decode_attention_inputs(
        KernelCase("decode_attention", (2, 4, 100, 32), "float32", position=70), "cpu"
    )
    visible = kernels.visible_keys(position, 100)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=visible.repeat(4, 1))
    torch.testing.assert_close(kernels.decode_attention_reference(q, keys, values, position), want)
    torch.testing.assert_close(kernels.decode_attention_reference(q, keys, values, position[0]), want)


def _custom_op_args() -> list[tuple[object, tuple]]:
    x = torch.randn(2, 3, 64)
    gate_up = torch.randn(2, 3, 128)
    weight = torch.randn(64)
    attention = _decode_attention_inputs(KernelCase("decode_attention", (2, 4, 100, 32), "float32",
                                                    position=70), "cpu")
    row, matrix, caches = torch.randn(1, 1, 64), torch.randn(32, 64), torch.randn(2, 2, 2, 20, 16)
    qkv = torch.randn(1, 1, (4 + 2 * 2) * 16)
    return [
        (rms_norm_op, (x, weight, EPS)),
        (add_rms_norm_op, (x, torch.randn_like(x), weight, EPS)),
        (silu_mul_op, (gate_up[..., :64], gate_up[..., 64:])),
        (decode_attention_op, attention),
        (gemv_op, (row, matrix, weight, EPS, torch.randn(1, 1, 32))),
        (swiglu_gemv_op, (torch.randn(1, 1, 128), matrix, torch.randn(1, 1, 32))),
        (qk_norm_rope_cache_op, (qkv, torch.randn(16), torch.randn(16), EPS, torch.randn(1, 8), torch.randn(1, 8),
                                 caches[0], caches[1], 1, torch.tensor([5]), 4)),
    ]


@pytest.mark.parametrize("index", range(7), ids=["rms_norm", "add_rms_norm", "silu_mul", "decode_attention",
                                                 "gemv", "swiglu_gemv", "qk_norm_rope_cache"])
def test_custom_op_registration_passes_opcheck(index):
    op, args = _custom_op_args()[index]
    torch.library.opcheck(op, args)


def test_custom_ops_in_a_compiled_graph_on_cpu():
    def decoder_tail(x, residual, weight, gate_up):
        normed, new_residual = torch.ops.omni.add_rms_norm(x, residual, weight, EPS)
        activated = torch.ops.omni.silu_mul(gate_up[..., :64], gate_up[..., 64:])
        return normed, torch.ops.omni.rms_norm(activated, weight, EPS), new_residual

    def decoder_tail_reference(x, residual, weight, gate_up):
        normed, new_residual = kernels.add_rms_norm_reference(x, residual, weight, EPS)
        activated = kernels.silu_mul_reference(gate_up[..., :64], gate_up[..., 64:])
        return normed, kernels.rms_norm_reference(activated, weight, EPS), new_residual

    x, residual, gate_up = torch.randn(1, 5, 64), torch.randn(1, 5, 64), torch.randn(1, 5, 128)
    weight = torch.randn(64)
    compiled = torch.compile(decoder_tail, fullgraph=True)
    torch.testing.assert_close(
        compiled(x, residual, weight, gate_up), decoder_tail_reference(x, residual, weight, gate_up)
    )



def test_decode_attention_op_in_a_dynamic_compiled_graph_on_cpu():
    """As the fast runner compiles a layer: dynamic shapes, kv_len a traced int slicing the cache."""
    def attend(q, k_cache, v_cache, position, kv_len):
        keys, values = k_cache[1:, :, :kv_len], v_cache[1:, :, :kv_len]
        return torch.ops.omni.decode_attention(q, keys, values, position) * 2.0

    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(2, 2, 2, 256, 32)
    q = torch.randn(1, 2, 4, 32)
    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    for kv_len, position in ((100, 70), (160, 159)):
        position = torch.tensor([position])
        keys, values = k_cache[1:, :, :kv_len], v_cache[1:, :, :kv_len]
        torch.testing.assert_close(compiled(q, k_cache, v_cache, position, kv_len),
                                   kernels.decode_attention_reference(q, keys, values, position) * 2.0)


def test_bench_cases_cover_models_and_rows_and_feed_their_ops():
    from bench.kernels import DECODE_KV_LENS, KERNEL_NAMES, ROWS, build_cases, gemv_shapes

    cases = build_cases(torch.device("cpu"))
    assert list(dict.fromkeys(case.kernel for case in cases)) == list(KERNEL_NAMES)  # in this order
    assert {(c.kernel, c.model, c.rows) for c in cases} == {
        (kernel, model, rows)
        for kernel in ("rms_norm", "add_rms_norm", "silu_mul")
        for model in ("llm", "tts")
        for rows in ROWS
    } | {("decode_attention", model, kv_len) for model in ("llm", "tts") for kv_len in DECODE_KV_LENS} | {
        (kernel, model, rows) for kernel, model, rows, _ in gemv_shapes()
    } | {  # the decode fusion's kernels: q/k/v with its norm, o and down with their residual, the prologue
        ("gemv_norm", "llm", 6144), ("gemv_residual", "llm", 4096), ("swiglu_gemv_residual", "llm", 4096),
        ("qk_norm_rope_cache", "llm", 48), ("gemv_norm", "tts", 2304), ("gemv_residual", "tts", 768),
        ("swiglu_gemv_residual", "tts", 768), ("qk_norm_rope_cache", "tts", 36),
    }
    assert {(c.rows, c.cols) for c in cases if "gemv" in c.kernel} == {
        (rows, cols) for rows, cols in GEMV_MODEL_SHAPES + SWIGLU_GEMV_MODEL_SHAPES + [(6562, 768)]
    }
    for case in (c for c in cases if c.rows == 1 or c.rows == DECODE_KV_LENS[0] or c.model == "tts"):
        torch.testing.assert_close(case.caller(case.triton_fn)(), case.caller(case.reference_fn)())


def test_bench_compiled_reference_compiles_once_over_the_weight_copies():
    """A product's case feeds a different weight copy at every call; the compiled reference must take them
    all with one graph (dynamo sees the reference, not the call counter that picks the copy)."""
    from torch._dynamo.utils import counters

    from bench.kernels import build_cases

    case = next(c for c in build_cases(torch.device("cpu"), ("gemv",)) if c.model == "tts" and c.rows == 2304)
    assert len(case.weights) > 2
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    call = case.caller(torch.compile(case.reference_fn, dynamic=False))
    for _ in range(len(case.weights) + 1):
        call()
    assert counters["stats"]["unique_graphs"] - graphs_before == 1


def test_bench_kernel_filter_selects_rows_and_rejects_unknown_names(capsys):
    from bench.kernels import build_cases, main

    chosen = build_cases(torch.device("cpu"), ("swiglu_gemv", "qk_norm_rope_cache"))
    assert {(case.kernel, case.model) for case in chosen} == {
        (kernel, model) for kernel in ("swiglu_gemv", "qk_norm_rope_cache") for model in ("llm", "tts")}
    for argv, message in ((["--kernels", "gemv,nope"], "unknown kernel(s) nope"), (["--kernels", ","], "no kernel"),
                          (["--sweep-gemv", "--kernels", "gemv"], "--sweep-gemv sweeps")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_bench_entry_point_skips_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the benchmark would really run")
    proc = subprocess.run([sys.executable, "-m", "bench.kernels", "--json"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "CUDA is required" in json.loads(proc.stdout)["skipped"]


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda case: case.id)
def test_kernel_matches_reference_on_cuda(switch_on, case):
    assert check_case(case, "cuda") is None


@pytest.mark.gpu
@cuda_only
def test_kernels_inside_cuda_graphs(switch_on):
    def block(x, residual, weight, gate_up):
        normed, new_residual = kernels.add_rms_norm(x, residual, weight, EPS)
        return kernels.rms_norm(kernels.silu_mul(gate_up) * normed, weight, EPS), new_residual

    def block_reference(x, residual, weight, gate_up):
        normed, new_residual = kernels.add_rms_norm_reference(x, residual, weight, EPS)
        half = gate_up.shape[-1] // 2
        activated = kernels.silu_mul_reference(gate_up[..., :half], gate_up[..., half:])
        return kernels.rms_norm_reference(activated * normed, weight, EPS), new_residual

    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)
    for step in range(4):  # warmup, recording, then replays
        torch.manual_seed(step)
        args = [torch.randn(1, 4, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        args += [torch.randn(4096, device="cuda", dtype=torch.bfloat16),
                 torch.randn(1, 4, 8192, device="cuda", dtype=torch.bfloat16)]
        torch.testing.assert_close(compiled(*args), block_reference(*args), atol=5e-2, rtol=5e-2)



@pytest.mark.gpu
@cuda_only
def test_qk_norm_rope_cache_inside_a_cuda_graph(switch_on):
    """As a fused decode step uses it: compiled with dynamic shapes, captured once for slot 2 of a
    full-size LLM cache, replayed at several positions written into a static position tensor; each replay
    gives the reference's queries and leaves both whole caches as the reference leaves them."""
    heads, kv_heads, head_dim, max_len, dtype = 32, 8, 128, 8192, torch.bfloat16
    caches = [torch.randn(3, kv_heads, max_len, head_dim, device="cuda", dtype=dtype) for _ in range(2)]
    qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    norms = [(1.0 + 0.3 * torch.randn(head_dim, device="cuda")).to(dtype) for _ in range(2)]
    cos, sin = (torch.randn(1, head_dim // 2, device="cuda", dtype=dtype) for _ in range(2))
    position = torch.zeros(1, dtype=torch.long, device="cuda")

    def step(qkv, cos, sin, position):
        return kernels.qk_norm_rope_cache(qkv, *norms, EPS, cos, sin, *caches, 2, position, heads) * 1.0

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        compiled(qkv, cos, sin, position)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(qkv, cos, sin, position)
    for pos in (0, 1, 4095, max_len - 1):
        position.fill_(pos)
        for tensor in (qkv, cos, sin):
            tensor.copy_(torch.randn_like(tensor))
        expected = [cache.clone() for cache in caches]
        want = kernels.qk_norm_rope_cache_reference(qkv, *norms, EPS, cos, sin, *expected, 2, position, heads)
        graph.replay()
        torch.testing.assert_close(out, want, atol=5e-2, rtol=5e-2)
        for got, reference in zip(caches, expected):
            torch.testing.assert_close(got, reference, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@cuda_only
def test_decode_attention_inside_a_cuda_graph(switch_on):
    """As the fast runner uses it: compiled with dynamic shapes, captured once per kv_len, replayed at
    several positions written in place into a static position tensor."""
    kv_heads, groups, head_dim, kv_len = 8, 4, 128, 2048
    k_cache, v_cache = torch.randn(2, 2, kv_heads, 4096, head_dim, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, kv_heads, groups, head_dim, device="cuda", dtype=torch.bfloat16)
    position = torch.zeros(1, dtype=torch.long, device="cuda")

    def step(q, position):
        keys, values = k_cache[1, :, :kv_len].unsqueeze(0), v_cache[1, :, :kv_len].unsqueeze(0)
        return kernels.decode_attention(q, keys, values, position) * 1.0

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        compiled(q, position)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(q, position)
    for pos in (0, 1, 511, 1500, kv_len - 1):
        position.fill_(pos)
        q.copy_(torch.randn_like(q))
        graph.replay()
        keys, values = k_cache[1, :, :kv_len].unsqueeze(0), v_cache[1, :, :kv_len].unsqueeze(0)
        want = kernels.decode_attention_reference(q, keys, values, position)
        torch.testing.assert_close(out, want, atol=5e-2, rtol=5e-2)


if __name__ == "__main__":
    print(json.dumps(interpreter_report()))


def test_fused_decode_prologue_applies_only_where_its_kernel_does():
    from workers.model.layers import Attention

    def attention(head_dim: int, qk_norm: bool = True) -> Attention:
        module = Attention(hidden=64, heads=4, kv_heads=2, head_dim=head_dim, eps=EPS, qk_norm=qk_norm)
        module.fuse_projections()
        return module

    assert attention(16)._fusable_decode_prologue() and attention(16, qk_norm=False)._fusable_decode_prologue()
    assert not attention(12)._fusable_decode_prologue()  # not a power of 2: no Triton block
    unfused = Attention(hidden=64, heads=4, kv_heads=2, head_dim=16, eps=EPS, qk_norm=True)
    assert not unfused._fusable_decode_prologue()
    different_eps = attention(16)
    different_eps.k_norm.eps = 1e-5
    assert not different_eps._fusable_decode_prologue()
