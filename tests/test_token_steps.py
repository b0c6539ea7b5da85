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
from workers.engine.decoding import RULE_CALLS_MAX, control_mask, forbidden_mask
from workers.engine.engine import DuplexEngine
from workers.engine.heads import DecodeHeads
from workers.engine.runners import DecoderRunner
from workers.engine.token_steps import TTS_CODES_MAX, TTSTokenSteps
from workers.media import load_media
from workers.model.omni import build_model
from workers.model.presets import TINY
from workers.model.tts import CodeSteps

UNITS = 9  # one forced cycle and the next one's first speaking unit


def _tts_steps_and_reference(device: str) -> tuple[object, TTSTokenSteps, CodeSteps]:
    """A tiny model whose TTS has 3 codes and EOS (EOS comes quickly), its fast TTS runner (CUDA graphs on
    CUDA) and heads, and the two steppers over them."""
    torch.manual_seed(0)
    model = build_model(replace(TINY, tts=replace(TINY.tts, num_audio_tokens=4)), device, torch.float32)
    model.tts.fold_weight_norm()
    model.llm.model.setup_caches(1, 64)
    model.tts.model.setup_caches(1, 256)
    runner = DecoderRunner(model.tts.model, "fast")
    vocab = model.args.llm.vocab
    heads = DecodeHeads(model, lambda hidden: model.llm.logits(hidden)[0], forbidden_mask(vocab, [], device),
                        control_mask(vocab, device), slots=1)
    return model, TTSTokenSteps(model, runner, heads, slots=1), CodeSteps(model.tts, runner, heads.tts)


def _check_tts_token_steps(device: str) -> None:
    model, token_steps, reference = _tts_steps_and_reference(device)
    tts, runner = model.tts, token_steps.runner
    condition = tts.build_condition(torch.tensor([7, 8], device=device),
                                    torch.randn(2, TINY.tts.llm_dim, device=device))

    def both(start_pos: int, min_new: int, max_new: int, seed: int) -> list[tuple[list[int], int]]:
        # A strong frequency penalty, so that a wrong recent-code window shows in the codes.
        return [tts.generate_codes(condition, 0, start_pos, 1.0, min_new, max_new,
                                   torch.Generator(device).manual_seed(seed), penalty=4.0, backbone=runner,
                                   steps=steps) for steps in (reference, token_steps)]

    stopped_early = 0
    for seed in range(6):
        first = both(0, 0, 40, seed)
        assert first[0] == first[1], f"seed {seed}"
        stopped_early += len(first[0][0]) < 40
        # The next call continues the turn, so a dropped look-ahead step's K/V would show; EOS blocked for 5.
        more = both(first[0][1], 5, 40, seed + 9)
        assert more[0] == more[1] and len(more[0][0]) >= 5, f"seed {seed}"
    assert stopped_early >= 3, "too few calls ended at an EOS to cover the dropped look-ahead step"
    forced = both(0, 30, 30, 0)
    assert forced[0] == forced[1] and len(forced[0][0]) == 30 and forced[0][1] == 3 + 29
    with pytest.raises(ValueError, match=f"at most {TTS_CODES_MAX} codes"):
        tts.generate_codes(condition, 0, 0, 1.0, 0, TTS_CODES_MAX + 1, None, backbone=runner, steps=token_steps)


def test_tts_token_steps_match_one_step_at_a_time_with_early_eos():
    _check_tts_token_steps("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tts_token_steps_match_one_step_at_a_time_with_early_eos_cuda_graphs_gpu():
    """The same with CUDA graphs, pinned host rows and events: the steps launched ahead of the reads."""
    _check_tts_token_steps("cuda")


def test_rule_calls_bound_is_the_settings_bound():
    """The rule state holds a row of random numbers per decode step: as many as a unit may have."""
    bound = next(m.le for m in SessionSettings.model_fields["max_new_speak_tokens_per_chunk"].metadata
                 if hasattr(m, "le"))
    assert bound == RULE_CALLS_MAX


def _session_outputs(token_steps: bool, schedule: str, device: str = "cpu") -> list[tuple]:
    """A seeded sampling session's per-unit outputs. `forced_budget`: the forced schedule with a turn text
    budget (a remembered token differs from the one fed) and a barge-in (unit 6 forced to listen while the
    turn is open)."""
    cfg = ServiceConfig.model_validate({"model": {"preset": "tiny", "device": device, "dtype": "float32",
                                                  "acceleration": "fast", "seed": 7},
                                        "compile": {"token_steps": token_steps}})
    engine = DuplexEngine(cfg)
    engine.warmup()
    steps_run = {"llm": 0, "tts": 0}
    if token_steps:  # count the token steps' calls, to know they ran
        llm_steps, tts_next = engine.llm_steps, engine.tts_steps.next

        def counted_llm_step(*args: object) -> tuple[int, torch.Tensor]:
            steps_run["llm"] += 1
            return llm_steps(*args)

        def counted_tts_step(*args: object) -> int:
            steps_run["tts"] += 1
            return tts_next(*args)

        engine.llm_steps, engine.tts_steps.next = counted_llm_step, counted_tts_step
    clip = load_media(WARMUP_MP4)
    session = engine.new_session("token-steps", schedule="forced" if schedule == "forced_budget" else schedule)
    settings = SessionSettings(force_listen_count=0, seed=3, max_tokens=30 if schedule == "forced_budget" else None)
    session.prepare("You are a helpful assistant.", settings, None, None)
    assert session.captured_rule
    outputs = []
    for index in range(UNITS):
        session.push_audio(clip.audio_chunks[index % len(clip.audio_chunks)])
        barge_in = schedule == "forced_budget" and index == 6
        result = session.run_unit(clip.frame_images(index % len(clip.audio_chunks)), force_listen=barge_in)
        session.finalize()
        outputs.append((result.is_listen, result.text, result.n_tokens, result.n_tts_tokens, result.end_of_turn,
                        result.kv_cache_length, result.decode_steps, result.audio))
    session.close()
    if token_steps:
        engine.llm_steps = llm_steps
        assert steps_run["llm"] > 0 and steps_run["tts"] > 0, steps_run
    assert engine.recompiles_since_warmup() == 0
    return outputs


def _assert_same_outputs(expected: list[tuple], actual: list[tuple]) -> None:
    for unit, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert got[:7] == want[:7], f"unit {unit}: {got[:7]} != {want[:7]}"
        np.testing.assert_array_equal(got[7], want[7])
    assert any(not unit[0] for unit in expected), "no unit spoke: the comparison would not cover the steps"


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["forced", "forced_budget", "natural"])
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
