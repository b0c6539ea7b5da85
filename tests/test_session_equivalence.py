"""A whole tiny-preset session gives the same greedy tokens eager and accelerated (issue 6, tier 3).

Two engines with the same seed (so the same random weights) run the same 10-unit session on the
warmup MP4 with greedy decoding and `force_listen_count` 0, so the weights decide every unit: one
engine eager, one in the `fast` mode (each decoder layer compiled by inductor's C++ backend, prefill
padded to buckets, bucketed attention lengths, fused projections; no CUDA graphs on CPU). Every unit's
decision, text, token and code counts must be equal, and the audio close.

GPU (`-m gpu`): the same 10-unit session on the full preset, eager against `fast` with its CUDA graphs and
Triton kernels (GEMV, split-KV attention, norms). In bf16, random weights leave near-ties that rounding
flips (the layer-by-layer test measured 8 of 11 greedy tokens equal on an H100), so this run is in fp32
with TF32 off: there the two paths differ only in summation order, and every token must be equal. The
fast engine runs twice, without and with `compile.decode_fusion`, against one eager run.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from common.config import ServiceConfig, SessionSettings
from workers.compile import WARMUP_MP4
from workers.engine.engine import DuplexEngine
from workers.media import load_media

UNITS = 10


def _session_outputs(acceleration: str, preset: str = "tiny", device: str = "cpu",
                     decode_fusion: bool = False) -> list[tuple]:
    cfg = ServiceConfig.model_validate({"model": {"preset": preset, "device": device, "dtype": "float32",
                                                  "acceleration": acceleration, "seed": 7},
                                        "compile": {"decode_fusion": decode_fusion}})
    engine = DuplexEngine(cfg)
    engine.warmup()
    clip = load_media(WARMUP_MP4)
    session = engine.new_session("equivalence")
    settings = SessionSettings(decode_mode="greedy", force_listen_count=0, seed=0)
    session.prepare("You are a helpful assistant.", settings, None, None)
    outputs = []
    for index in range(UNITS):
        session.push_audio(clip.audio_chunks[index % len(clip.audio_chunks)])
        result = session.run_unit(clip.frame_images(index % len(clip.audio_chunks)))
        session.finalize()
        outputs.append((result.is_listen, result.text, result.n_tokens, result.n_tts_tokens,
                        result.end_of_turn, result.kv_cache_length, result.audio))
    session.close()
    assert engine.recompiles_since_warmup() == 0
    return outputs


def _assert_same_session(expected: list[tuple], actual: list[tuple]) -> None:
    assert len(actual) == len(expected) == UNITS
    spoken = 0
    for unit, (want, got) in enumerate(zip(expected, actual)):
        assert got[:6] == want[:6], f"unit {unit}: {got[:6]} != {want[:6]}"
        assert got[6].shape == want[6].shape
        np.testing.assert_allclose(got[6], want[6], atol=2e-3)
        spoken += 0 if want[0] else 1
    assert spoken > 0, "the session never spoke: the comparison would not cover the TTS and vocoder"


@pytest.mark.slow
def test_fast_session_greedy_tokens_equal_eager_tiny_cpu():
    _assert_same_session(_session_outputs("eager"), _session_outputs("fast"))


@contextmanager
def _tf32_off() -> Iterator[None]:
    """Plain fp32 matmuls and convolutions (no TF32) for the duration, restored afterwards. (Not through
    pytest's monkeypatch: torch's backend flags are not plain attributes, and its undo deletes them.)"""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def eager_full_preset_fp32_session() -> list[tuple]:
    """The eager full-preset session, run once for every fast variant compared with it."""
    with _tf32_off():
        outputs = _session_outputs("eager", "minicpm-o-4.5", "cuda")
    gc.collect()  # the eager engine's ~40 GB of fp32 weights go before a fast engine loads its own
    torch.cuda.empty_cache()
    return outputs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode_fusion", [False, True], ids=["unfused", "decode_fusion"])
def test_fast_session_greedy_tokens_equal_eager_full_preset_fp32_gpu(
        eager_full_preset_fp32_session: list[tuple], decode_fusion: bool):
    with _tf32_off():
        actual = _session_outputs("fast", "minicpm-o-4.5", "cuda", decode_fusion)
    gc.collect()  # this fast engine's weights go before the next variant's engine loads its own
    torch.cuda.empty_cache()
    _assert_same_session(eager_full_preset_fp32_session, actual)
