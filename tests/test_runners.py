"""DecoderRunner on CPU (workers/engine/runners.py): `fast` (compiled layers, padded prefill buckets,
bucketed attention; no CUDA graphs here) against `eager`, on the tiny TTS backbone in fp32.

Eager runs on slot 0, fast on slot 1 of the same caches, so the two paths also leave comparable K/V.
The fast runner uses a slot length (192) below the cache length (256): positions beyond it must stay
untouched by padding. Compiles are shared by the module (CPU compile time is the cost of this file).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from workers.engine.runners import DecoderRunner, dynamo_graph_count
from workers.model.presets import TINY
from workers.model.tts import MiniCPMTTS

REPO_ROOT = Path(__file__).resolve().parent.parent
EAGER_SLOT, FAST_SLOT = 0, 1
SLOT_LEN = 192
CACHE_LEN = 256
HIDDEN = TINY.tts.hidden


@pytest.fixture(scope="module")
def runners() -> tuple[DecoderRunner, DecoderRunner, int]:
    """(eager, warmed-up fast, graphs compiled by the warm-up) over one tiny TTS decoder."""
    torch.manual_seed(0)
    tts = MiniCPMTTS(TINY.tts)
    tts.init_weights()
    tts.model.setup_caches(2, CACHE_LEN)
    decoder = tts.model.eval().requires_grad_(False)
    eager = DecoderRunner(decoder, "eager")
    fast = DecoderRunner(decoder, "fast", max_len=SLOT_LEN, prefill_buckets=(16, 32), kv_bucket=64)
    before = dynamo_graph_count()
    fast.warmup([FAST_SLOT])
    return eager, fast, dynamo_graph_count() - before


def embeddings(count: int, seed: int) -> torch.Tensor:
    return torch.randn(1, count, HIDDEN, generator=torch.Generator().manual_seed(seed))


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).min().item()


def cache_of(runner: DecoderRunner, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's (K, V) of `slot`."""
    caches = [layer.self_attn.kv_cache for layer in runner.decoder.layers]
    return [(cache.k_cache[slot].clone(), cache.v_cache[slot].clone()) for cache in caches]


def copy_slot(runner: DecoderRunner, source: int, target: int) -> None:
    for layer in runner.decoder.layers:
        cache = layer.self_attn.kv_cache
        cache.k_cache[target].copy_(cache.k_cache[source])
        cache.v_cache[target].copy_(cache.v_cache[source])


def test_warmup_covers_every_bucket_with_few_compiles(runners):
    _, fast, compiled = runners
    # decode at 3 kv buckets + prefill 16 and 32 at 3 each: 9 shapes, compiled as T == 1 and T > 1 graphs.
    assert len(fast.fast_shapes()) == 9
    assert 1 <= compiled <= 2
    assert fast.recompiles_since_warmup() == 0


def test_fast_matches_eager_for_odd_prefill_and_20_decode_steps(runners):
    eager, fast, _ = runners
    prompt, steps = embeddings(13, seed=1), embeddings(20, seed=2)
    outputs = {}
    for name, runner, slot in (("eager", eager, EAGER_SLOT), ("fast", fast, FAST_SLOT)):
        hidden = [runner(prompt, 0, slot)]
        hidden += [runner(steps[:, i:i + 1], 13 + i, slot) for i in range(20)]
        outputs[name] = torch.cat(hidden, dim=1)
    assert outputs["fast"].shape == (1, 33, HIDDEN)
    assert min_cosine(outputs["fast"], outputs["eager"]) >= 0.9999
    for (k_eager, v_eager), (k_fast, v_fast) in zip(cache_of(eager, EAGER_SLOT), cache_of(fast, FAST_SLOT)):
        torch.testing.assert_close(k_fast[:, :33], k_eager[:, :33], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v_fast[:, :33], v_eager[:, :33], rtol=1e-4, atol=1e-5)
    assert fast.recompiles_since_warmup() == 0


def test_chunked_prefill_and_padding_leave_earlier_cache_untouched(runners):
    eager, fast, _ = runners
    prompt = embeddings(45, seed=3)
    # 40 tokens = a full 32-bucket chunk + 8 tokens padded to 16.
    expected = eager(prompt[:, :40], 0, EAGER_SLOT)
    torch.testing.assert_close(fast(prompt[:, :40], 0, FAST_SLOT), expected, rtol=1e-4, atol=1e-5)
    before = cache_of(fast, FAST_SLOT)
    expected = eager(prompt[:, 40:], 40, EAGER_SLOT)
    # 5 tokens padded to 16: padding writes positions 45..55, beyond the live length.
    torch.testing.assert_close(fast(prompt[:, 40:], 40, FAST_SLOT), expected, rtol=1e-4, atol=1e-5)
    after, reference = cache_of(fast, FAST_SLOT), cache_of(eager, EAGER_SLOT)
    for (k_before, v_before), (k_after, v_after), (k_ref, v_ref) in zip(before, after, reference):
        assert torch.equal(k_after[:, :40], k_before[:, :40])
        assert torch.equal(v_after[:, :40], v_before[:, :40])
        torch.testing.assert_close(k_after[:, 40:45], k_ref[:, 40:45], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v_after[:, 40:45], v_ref[:, 40:45], rtol=1e-4, atol=1e-5)
    assert fast.recompiles_since_warmup() == 0


def test_prefill_at_the_end_of_the_slot_never_writes_past_it(runners):
    eager, fast, _ = runners
    copy_slot(fast, EAGER_SLOT, FAST_SLOT)
    start = SLOT_LEN - 5
    prompt = embeddings(5, seed=4)
    expected = eager(prompt, start, EAGER_SLOT)
    # A padded bucket would reach past SLOT_LEN: the runner feeds these tokens one by one instead.
    torch.testing.assert_close(fast(prompt, start, FAST_SLOT), expected, rtol=1e-4, atol=1e-5)
    for k_cache, v_cache in cache_of(fast, FAST_SLOT):
        assert not k_cache[:, SLOT_LEN:].any() and not v_cache[:, SLOT_LEN:].any()
    with pytest.raises(ValueError, match="exceed"):
        fast(embeddings(6, seed=5), start, FAST_SLOT)
    assert fast.recompiles_since_warmup() == 0


def test_runner_rejects_bad_configurations(runners):
    eager, _, _ = runners
    with pytest.raises(ValueError, match="unknown mode"):
        DecoderRunner(eager.decoder, "turbo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CUDA graphs"):
        DecoderRunner(eager.decoder, "eager", cuda_graphs=True)
    with pytest.raises(ValueError, match="max_len"):
        DecoderRunner(eager.decoder, "eager", max_len=CACHE_LEN + 1)
    bare = MiniCPMTTS(TINY.tts).model
    with pytest.raises(ValueError, match="caches"):
        DecoderRunner(bare, "eager")


@pytest.mark.slow
def test_decode_steps_benchmark_entry_point_on_cpu(tmp_path):
    out = tmp_path / "decode_steps.json"
    command = [sys.executable, "-m", "bench.decode_steps", "--preset", "tiny", "--modes", "eager",
               "--steps", "3", "--warmup-steps", "1", "--llm-len", "512", "--tts-len", "512", "--json",
               "--out", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report == json.loads(out.read_text())
    assert report["command"].startswith("python -m bench.decode_steps --preset tiny")
    for backbone in ("llm", "tts"):
        result = report["modes"]["eager"][backbone]
        assert result["decode_ms"]["n"] == 3 and 0 < result["decode_ms"]["p50"] <= result["decode_ms"]["p95"]
        assert result["prefill_ms"]["p50"] > 0 and result["recompiles_after_warmup"] == 0


def test_compiled_layer_writes_only_the_new_kv_rows():
    """Inductor's code for a compiled decode step never loops over a whole KV slot: writing through the
    `k_cache[slot]` view made it copy every slot out and back per layer (≈ 1.6 ms of an 8 ms H100 step)."""
    from torch._inductor.utils import run_and_get_code

    from workers.engine.runners import _call_layer

    tts = MiniCPMTTS(TINY.tts).eval()
    tts.init_weights()
    max_len = 1000  # a slot of kv_heads x 1000 x head_dim elements: a size no other tensor has
    tts.model.setup_caches(2, max_len)
    decoder = tts.model
    slot_elements = decoder.kv_heads * max_len * decoder.head_dim
    position = torch.tensor([7])
    x = torch.randn(1, 1, TINY.tts.hidden)
    cos, sin = decoder.rope_cos[position], decoder.rope_sin[position]
    compiled = torch.compile(_call_layer, fullgraph=True, dynamic=True)
    with torch.no_grad():
        _, sources = run_and_get_code(compiled, decoder.layers[0], x, cos, sin, position, 1, 512)
        eager_keys = decoder.layers[0].self_attn.kv_cache.k_cache.clone()
        decoder.layers[0].self_attn.kv_cache.k_cache.zero_()
        decoder.layers[0](x, cos, sin, position, 1, 512)
    loops_over_a_slot = re.findall(rf"x\d+<static_cast<int64_t>\({slot_elements}L\)", "\n".join(sources))
    assert not loops_over_a_slot
    torch.testing.assert_close(decoder.layers[0].self_attn.kv_cache.k_cache, eager_keys)
    assert eager_keys[1, :, 7].abs().sum() > 0 and eager_keys[0].abs().sum() == 0
