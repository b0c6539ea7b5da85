"""The token steps of `fast` mode (workers/engine/token_steps.py) change no output: the same codes, tokens and
audio as the runner + head calls they replace, in sampling mode and at an early EOS (CPU, tiny preset; the GPU
session tests of tests/test_session_equivalence.py run them with CUDA graphs)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from common.config import ServiceConfig, SessionSettings
from workers.compile import WARMUP_MP4
from workers.engine.decoding import control_mask, forbidden_mask
from workers.engine.engine import DuplexEngine
from workers.engine.heads import DecodeHeads
from workers.engine.runners import DecoderRunner
from workers.engine.token_steps import TTS_CODES_MAX, TTSTokenSteps
from workers.media import load_media
from workers.model.omni import build_model
from workers.model.presets import TINY
from workers.model.tts import CodeSteps

UNITS = 9  # one forced cycle and the next one's first speaking unit


def _tts_steps_and_reference() -> tuple[object, TTSTokenSteps, CodeSteps]:
    """A tiny model whose TTS has 3 codes and EOS (EOS comes quickly), its fast TTS runner and heads, and
    the two steppers over them."""
    torch.manual_seed(0)
    model = build_model(replace(TINY, tts=replace(TINY.tts, num_audio_tokens=4)), "cpu", torch.float32)
    model.tts.fold_weight_norm()
    model.llm.model.setup_caches(1, 64)
    model.tts.model.setup_caches(1, 256)
    runner = DecoderRunner(model.tts.model, "fast")
    vocab = model.args.llm.vocab
    heads = DecodeHeads(model, lambda hidden: model.llm.logits(hidden)[0], forbidden_mask(vocab, [], "cpu"),
                        control_mask(vocab, "cpu"), slots=1)
    return model, TTSTokenSteps(model, runner, heads, slots=1), CodeSteps(model.tts, runner, heads.tts)


def test_tts_token_steps_match_one_step_at_a_time_with_early_eos():
    model, token_steps, reference = _tts_steps_and_reference()
    tts, runner = model.tts, token_steps.runner
    condition = tts.build_condition(torch.tensor([7, 8]), torch.randn(2, TINY.tts.llm_dim))
    stopped_early = 0
    for seed in range(6):
        results = []
        for steps in (reference, token_steps):
            # Each call continues the turn of the previous one, so a dropped step's K/V would show.
            # A strong frequency penalty, so that a wrong recent-code window shows in the codes.
            codes, pos = tts.generate_codes(condition, 0, 0, 1.0, 0, 40, torch.Generator().manual_seed(seed),
                                            penalty=4.0, backbone=runner, steps=steps)
            more, end = tts.generate_codes(condition, 0, pos, 1.0, 0, 40, torch.Generator().manual_seed(seed + 9),
                                           penalty=4.0, backbone=runner, steps=steps)
            results.append((codes, pos, more, end))
        assert results[0] == results[1], f"seed {seed}"
        stopped_early += len(results[0][0]) < 40
    assert stopped_early >= 3, "too few calls ended at an EOS to cover the dropped look-ahead step"
    forced = [tts.generate_codes(condition, 0, 0, 1.0, 30, 30, torch.Generator().manual_seed(0),
                                 backbone=runner, steps=steps) for steps in (reference, token_steps)]
    assert forced[0] == forced[1] and len(forced[0][0]) == 30 and forced[0][1] == 3 + 29
    with pytest.raises(ValueError, match=f"at most {TTS_CODES_MAX} codes"):
        tts.generate_codes(condition, 0, 0, 1.0, 0, TTS_CODES_MAX + 1, None, backbone=runner, steps=token_steps)


def _session_outputs(token_steps: bool, schedule: str, device: str = "cpu") -> list[tuple]:
    cfg = ServiceConfig.model_validate({"model": {"preset": "tiny", "device": device, "dtype": "float32",
                                                  "acceleration": "fast", "seed": 7},
                                        "compile": {"token_steps": token_steps}})
    engine = DuplexEngine(cfg)
    assert (engine.llm_steps is not None) == token_steps
    engine.warmup()
    clip = load_media(WARMUP_MP4)
    session = engine.new_session("token-steps", schedule=schedule)
    session.prepare("You are a helpful assistant.", SessionSettings(force_listen_count=0, seed=3), None, None)
    assert session.captured_rule
    outputs = []
    for index in range(UNITS):
        session.push_audio(clip.audio_chunks[index % len(clip.audio_chunks)])
        result = session.run_unit(clip.frame_images(index % len(clip.audio_chunks)))
        session.finalize()
        outputs.append((result.is_listen, result.text, result.n_tokens, result.n_tts_tokens, result.end_of_turn,
                        result.kv_cache_length, result.decode_steps, result.audio))
    session.close()
    assert engine.recompiles_since_warmup() == 0
    return outputs


def _assert_same_outputs(expected: list[tuple], actual: list[tuple]) -> None:
    for unit, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert got[:7] == want[:7], f"unit {unit}: {got[:7]} != {want[:7]}"
        np.testing.assert_array_equal(got[7], want[7])
    assert any(not unit[0] for unit in expected), "no unit spoke: the comparison would not cover the steps"


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["forced", "natural"])
def test_token_steps_change_no_sampled_output_tiny_cpu(schedule):
    """Sampling mode (the default settings, seeded): the same tokens, codes and audio with the token steps
    as with the runner + head calls, on one forced cycle and on the model's own decisions."""
    _assert_same_outputs(_session_outputs(False, schedule), _session_outputs(True, schedule))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("schedule", ["forced", "natural"])
def test_token_steps_change_no_sampled_output_tiny_cuda_graphs_gpu(schedule):
    """The same with CUDA graphs: the token steps' graphs against the runner's and the heads' graphs."""
    _assert_same_outputs(_session_outputs(False, schedule, "cuda"), _session_outputs(True, schedule, "cuda"))
