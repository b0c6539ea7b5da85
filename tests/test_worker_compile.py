"""workers/compile.py without running a compile: in-place wrapping, targets, cache bookkeeping."""

from __future__ import annotations

import os

import pytest

from common.config import REPO_ROOT, CompileConfig, load_config
from workers import compile as compile_tools
from workers.engine.engine import DuplexEngine

COUNTER_NAMES = ("fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit", "autograd_cache_miss")


@pytest.fixture()
def engine() -> DuplexEngine:
    return DuplexEngine(load_config(overrides=["model.preset=tiny", "model.device=cpu"]))


def is_compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_compile_is_in_place_and_shares_weights(engine):
    model = engine.model
    names_before = list(model.state_dict().keys())
    params_before = {name: p for name, p in model.named_parameters()}
    compiled = compile_tools.apply_torch_compile(engine, CompileConfig(modules=["vpm", "llm", "token2wav"]))
    assert compiled == ["vpm", "llm", "token2wav"]
    assert is_compiled(model.vpm) and is_compiled(model.llm.model)
    assert all(is_compiled(m) for m in (engine.token2wav.flow.estimator, engine.token2wav.hift))
    assert not any(is_compiled(m) for m in (model.resampler, model.tts.model, model.apm))
    assert not is_compiled(model.llm)  # the outer decode loop and lm_head stay eager
    assert list(model.state_dict().keys()) == names_before
    assert all(p is params_before[name] for name, p in model.named_parameters())


def test_engine_runners_own_the_decoders_outside_eager_mode(engine):
    engine.info["acceleration"] = "compile-default"
    compiled = compile_tools.apply_torch_compile(engine, CompileConfig())
    assert compiled == ["vpm", "resampler", "token2wav"]  # the default modules minus the decoders
    assert not is_compiled(engine.model.llm.model) and not is_compiled(engine.model.tts.model)


def test_configure_compile_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compile_tools.configure_compile_cache(tmp_path / "c") == tmp_path / "c"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    assert compile_tools.configure_compile_cache("torch_compile_cache") == REPO_ROOT / "torch_compile_cache"


@pytest.mark.parametrize(
    "after, verdict",
    [((3, 0), "hit"), ((3, 2), "partial"), ((0, 4), "miss"), ((0, 0), "none")],
)
def test_cache_verdict(after, verdict):
    zero = dict.fromkeys(COUNTER_NAMES, 0) | {"fxgraph_cache_hit": 5, "fxgraph_cache_miss": 1}
    later = dict(zero, fxgraph_cache_hit=5 + after[0], fxgraph_cache_miss=1 + after[1])
    result = compile_tools.cache_verdict(zero, later)
    assert result == {"hits": after[0], "misses": after[1], "verdict": verdict}
    phrase = compile_tools.describe_cache(result, 12.34)
    assert phrase.endswith("compile took 12.3 s") and f"{after[0]} cache hits" in phrase


def test_counters_read_inductor_counters():
    counters = compile_tools.compile_cache_counters()
    assert set(counters) == set(COUNTER_NAMES)
    assert all(isinstance(v, int) and v >= 0 for v in counters.values())


def test_precompile_record_round_trip(tmp_path):
    assert compile_tools.read_precompile_record(tmp_path) is None
    compile_tools.write_precompile_record(tmp_path, {"cold_compile_s": 12.5})
    assert compile_tools.read_precompile_record(tmp_path) == {"cold_compile_s": 12.5}
    (tmp_path / compile_tools.PRECOMPILE_RECORD).write_text("{broken")
    assert compile_tools.read_precompile_record(tmp_path) is None
