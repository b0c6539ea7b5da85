"""The duplex decode rule (MODEL.md §4, fixes of §6 #1-2) on hand-made logits."""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from workers.engine.decoding import (
    DecodeParams,
    apply_length_penalty,
    apply_listen_scale,
    apply_repetition_penalty,
    choose_token,
    control_mask,
    decode_rule,
    draw_uniforms,
    filter_top_k_top_p,
    forbidden_mask,
    recent_window,
    text_only_mask,
)
from workers.model import tokens

VOCAB = 151748
GREEDY = DecodeParams(greedy=True, repetition_penalty=1.0, length_penalty=1.0)


def _logits(**values: float) -> torch.Tensor:
    logits = torch.full((VOCAB,), -5.0)
    for key, value in values.items():
        logits[int(key.removeprefix("t"))] = value
    return logits


def _no_mask() -> torch.Tensor:
    return forbidden_mask(VOCAB, [], "cpu")


def test_chunk_eos_wins_in_the_first_draw_but_is_masked_afterwards() -> None:
    logits = _logits(**{f"t{tokens.CHUNK_EOS}": 10.0, "t500": 9.0})
    assert choose_token(logits, GREEDY, [], _no_mask(), None) == tokens.CHUNK_EOS
    logits = _logits(**{f"t{tokens.CHUNK_EOS}": 9.0, "t500": 10.0, f"t{tokens.TTS_PAD}": 9.5})
    # not drawn first -> chunk_eos masked; tts_pad is always masked
    assert choose_token(logits, GREEDY, [], _no_mask(), None) == 500


def test_bad_token_ids_are_masked() -> None:
    logits = _logits(t700=10.0, t800=9.0)
    assert choose_token(logits, GREEDY, [], forbidden_mask(VOCAB, [700], "cpu"), None) == 800
    assert choose_token(logits, GREEDY, [], _no_mask(), None) == 700


def test_repetition_penalty_is_sign_aware_on_text_tokens_only() -> None:
    logits = _logits(t10=2.0, t11=-2.0, **{f"t{tokens.SPEAK}": 2.0})
    logits[tokens.TTS_PAD] = float("-inf")  # masked by step 2 before the penalty; empty entries point at it
    recent = recent_window([10, 11, 10, tokens.SPEAK], 6, "cpu")  # a repeat and empty entries
    control = control_mask(VOCAB, "cpu")
    settings = DecodeParams(repetition_penalty=2.0).as_tensor("cpu")
    ours = apply_repetition_penalty(logits.clone(), recent, settings, control)
    assert ours[10] == 1.0 and ours[11] == -4.0 and ours[tokens.SPEAK] == 2.0 and ours[12] == -5.0
    settings = DecodeParams(repetition_penalty=2.0, reference=True).as_tensor("cpu")
    ref = apply_repetition_penalty(logits.clone(), recent, settings, control)
    assert ref[10] == 1.0 and ref[11] == -1.0 and ref[tokens.SPEAK] == 1.0 and ref[12] == -5.0


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = _logits(t10=3.0, t20=2.0)
    params = DecodeParams(greedy=True, repetition_penalty=2.0, length_penalty=1.0)
    assert choose_token(logits, params, [], _no_mask(), None) == 10
    assert choose_token(logits, params, [10, 10, 10], _no_mask(), None) == 20


def test_length_penalty_on_turn_eos() -> None:
    settings = DecodeParams(length_penalty=1.1).as_tensor("cpu")
    assert apply_length_penalty(_logits(**{f"t{tokens.TURN_EOS}": 2.2}), settings)[tokens.TURN_EOS].item() == \
        (torch.tensor(2.2) / torch.tensor(1.1)).item()
    assert apply_length_penalty(_logits(**{f"t{tokens.TURN_EOS}": -2.0}), settings)[tokens.TURN_EOS].item() == \
        (torch.tensor(-2.0) * torch.tensor(1.1)).item()


def test_listen_scale_is_additive_in_log_space_on_listen() -> None:
    params = DecodeParams(listen_prob_scale=0.5).as_tensor("cpu")
    scaled = apply_listen_scale(_logits(**{f"t{tokens.LISTEN}": -1.0}), params)
    assert math.isclose(scaled[tokens.LISTEN].item(), -1.0 + math.log(0.5), rel_tol=1e-6)
    # a probability scale: the listen probability ratio to another token halves
    before = _logits(**{f"t{tokens.LISTEN}": 1.0, "t600": 1.0})
    after = apply_listen_scale(before.clone(), params)
    ratio_before = (before.softmax(-1)[tokens.LISTEN] / before.softmax(-1)[600]).item()
    ratio_after = (after.softmax(-1)[tokens.LISTEN] / after.softmax(-1)[600]).item()
    assert math.isclose(ratio_after / ratio_before, 0.5, rel_tol=1e-4)
    reference = DecodeParams(listen_prob_scale=2.0, reference=True).as_tensor("cpu")
    ref = apply_listen_scale(_logits(**{f"t{tokens.IM_END}": -1.0}), reference)
    assert ref[tokens.IM_END] == -2.0 and ref[tokens.LISTEN] == -5.0  # the defect: wrong token, raw multiply


def test_listen_top_k_returns_listen_when_ranked_high_enough() -> None:
    logits = _logits(t100=5.0, t101=4.0, **{f"t{tokens.LISTEN}": 3.0})
    params = DecodeParams(greedy=True, listen_top_k=3, length_penalty=1.0)
    assert choose_token(logits, params, [], _no_mask(), None) == tokens.LISTEN
    params = DecodeParams(greedy=True, listen_top_k=2, length_penalty=1.0)
    assert choose_token(logits, params, [], _no_mask(), None) == 100


def test_top_k_top_p_filtering() -> None:
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0, -1.0])

    def kept_ids(top_k: int, top_p: float, candidates: int) -> list[int]:
        settings = DecodeParams(temperature=1.0, top_k=top_k, top_p=top_p).as_tensor("cpu")
        values, ids, kept = filter_top_k_top_p(logits, settings, candidates)
        assert bool((values[:int(kept)] > float("-inf")).all() and (values[int(kept):] == float("-inf")).all())
        return ids[:int(kept)].tolist()

    assert kept_ids(3, 1.0, 3) == [1, 2, 3]
    assert kept_ids(3, 1.0, 5) == [1, 2, 3]  # a captured graph's fixed candidate count, masked to top_k
    assert kept_ids(0, 0.5, 5) == [1]  # the top token alone holds > 50 %
    assert kept_ids(0, 0.9, 5) == [1, 2, 3]


def test_sampling_is_reproducible_with_a_seeded_generator_and_stays_in_top_k() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    params = DecodeParams(temperature=0.7, top_k=20, top_p=0.8, length_penalty=1.0)
    mask = forbidden_mask(VOCAB, [], "cpu")
    draws = [choose_token(logits, params, [], mask, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(draws)) == 1
    generator = torch.Generator().manual_seed(3)
    many = {choose_token(logits, params, [], mask, generator) for _ in range(50)}
    top20 = set(torch.topk(logits.masked_fill(mask, float("-inf")), 20).indices.tolist())
    assert many - {tokens.CHUNK_EOS} <= top20
    assert len(many) > 1


def test_from_settings_reads_every_decode_field() -> None:
    from common.config import SessionSettings

    settings = SessionSettings(decode_mode="greedy", temperature=0.3, top_k=5, top_p=0.5,
                               text_repetition_penalty=1.2, text_repetition_window_size=8, length_penalty=2.0,
                               listen_prob_scale=0.3, listen_top_k=4, reference_decode=True)
    params = DecodeParams.from_settings(settings)
    assert params == DecodeParams(greedy=True, temperature=0.3, top_k=5, top_p=0.5, repetition_penalty=1.2,
                                  repetition_window=8, length_penalty=2.0, listen_prob_scale=0.3,
                                  listen_top_k=4, reference=True)


def test_the_captured_size_of_the_rule_draws_the_same_tokens_as_the_eager_call() -> None:
    """decode_rule with the fixed sizes of the CUDA-graph path (a padded window, RULE_TOP_K_MAX candidates)
    chooses what choose_token chooses, for sampling, greedy and reference settings alike."""
    from workers.engine.decoding import RULE_TOP_K_MAX, RULE_WINDOW_MAX

    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    mask, control = forbidden_mask(VOCAB, [], "cpu"), control_mask(VOCAB, "cpu")
    recent = [int(i) for i in torch.topk(logits, 6).indices] + [tokens.SPEAK]
    settings_list = [
        DecodeParams(temperature=0.9, top_k=20, top_p=0.8, repetition_penalty=1.3, listen_prob_scale=0.5),
        DecodeParams(temperature=1.5, top_k=RULE_TOP_K_MAX, top_p=1.0, listen_top_k=3),
        DecodeParams(greedy=True, repetition_penalty=1.5),
        DecodeParams(temperature=0.7, top_k=5, top_p=0.95, reference=True, listen_prob_scale=2.0),
    ]
    for params in settings_list:
        for seed in range(20):
            eager = choose_token(logits, params, recent, mask, torch.Generator().manual_seed(seed))
            uniforms = draw_uniforms(params, torch.Generator().manual_seed(seed), "cpu")
            captured = decode_rule(logits, params.as_tensor("cpu"), recent_window(recent, RULE_WINDOW_MAX, "cpu"),
                                   mask, control, uniforms, RULE_TOP_K_MAX)
            assert int(captured) == eager, (params, seed)
            settings = params.as_tensor("cpu", text_only=True)
            text_only = decode_rule(logits, settings, recent_window(recent, RULE_WINDOW_MAX, "cpu"), mask, control,
                                    uniforms, RULE_TOP_K_MAX, excluded=text_only_mask(settings, control))
            eager = choose_token(logits, params, recent, mask, torch.Generator().manual_seed(seed), text_only=True)
            assert int(text_only) == eager, (params, seed)


def test_text_only_masks_control_tokens_before_the_first_draw() -> None:
    logits = _logits(t300=4.0, **{f"t{tokens.LISTEN}": 9.0, f"t{tokens.CHUNK_EOS}": 8.0})
    assert choose_token(logits, GREEDY, [], _no_mask(), None) == tokens.LISTEN
    assert choose_token(logits, GREEDY, [], _no_mask(), None, text_only=True) == 300


class _HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor value on the host (`.item()`, 0-dim tensor indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_the_rule_and_the_tts_sampler_never_read_a_value_on_the_host() -> None:
    """What a CUDA graph captures must not synchronise: no `.item()` anywhere in either step head."""
    from dataclasses import replace

    from workers.model.presets import get_preset
    from workers.model.tts import MiniCPMTTS

    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2))
    params = DecodeParams(temperature=0.9, top_k=20, listen_top_k=3, listen_prob_scale=0.5)
    inputs = (params.as_tensor("cpu"), recent_window([5, 6], 16, "cpu"), forbidden_mask(VOCAB, [], "cpu"),
              control_mask(VOCAB, "cpu"), torch.tensor([0.3, 0.6]))
    tts = MiniCPMTTS(replace(get_preset("tiny").tts, num_audio_tokens=64)).eval()
    tts.fold_weight_norm()
    with torch.no_grad(), _HostReads() as reads:
        decode_rule(logits, *inputs, 64)
        tts.sample_code(torch.randn(1, tts.args.hidden), torch.tensor([0.8, 1.05, 1.0]),
                        torch.tensor([3, -1, 3]), torch.tensor([0.4]))
    assert reads.count == 0


def test_the_first_draw_lands_on_a_token_exactly_when_the_full_draw_picks_it() -> None:
    from workers.engine.decoding import draw_lands_on, sample_index

    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    logits[tokens.CHUNK_EOS] = 9.0  # about half of the mass, so both outcomes occur
    hits = 0
    for uniform in torch.rand(200, generator=torch.Generator().manual_seed(4)):
        lands = bool(draw_lands_on(logits, uniform, tokens.CHUNK_EOS))
        assert lands == (int(sample_index(logits, uniform)) == tokens.CHUNK_EOS), float(uniform)
        hits += lands
    assert 0 < hits < 200


def test_the_compiled_step_heads_choose_what_the_eager_ones_choose() -> None:
    """The rule and the TTS sampler as `DecodeHeads.capture` compiles them (fullgraph, static shapes;
    Inductor's C++ backend here) pick the same ids as the plain calls, for sampling, greedy and reference
    settings and text-only steps."""
    from dataclasses import replace

    from workers.engine.decoding import RULE_TOP_K_MAX, RULE_WINDOW_MAX
    from workers.model.presets import get_preset
    from workers.model.tts import MiniCPMTTS

    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(7)) * 3
    mask, control = forbidden_mask(VOCAB, [], "cpu"), control_mask(VOCAB, "cpu")
    recent = recent_window([int(i) for i in torch.topk(logits, 6).indices], RULE_WINDOW_MAX, "cpu")

    def rule(logits, settings, recent, uniforms):  # noqa: ANN001, ANN202
        return decode_rule(logits, settings, recent, mask, control, uniforms, RULE_TOP_K_MAX,
                           excluded=text_only_mask(settings, control))

    compiled_rule = torch.compile(rule, fullgraph=True, dynamic=False)
    settings_list = [
        DecodeParams(temperature=0.9, top_k=20, top_p=0.8, repetition_penalty=1.3, listen_prob_scale=0.5),
        DecodeParams(greedy=True, repetition_penalty=1.5),
        DecodeParams(temperature=0.7, top_k=5, top_p=0.95, reference=True, listen_top_k=3),
    ]
    for params in settings_list:
        for text_only in (False, True):
            for seed in range(4):
                uniforms = draw_uniforms(params, torch.Generator().manual_seed(seed), "cpu")
                settings = params.as_tensor("cpu", text_only)
                assert int(compiled_rule(logits, settings, recent, uniforms)) == \
                    int(rule(logits, settings, recent, uniforms)), (params, text_only, seed)

    torch.manual_seed(0)
    tts = MiniCPMTTS(replace(get_preset("tiny").tts, num_audio_tokens=64)).eval()
    tts.init_weights()
    tts.fold_weight_norm()
    compiled_sampler = torch.compile(tts.sample_code, fullgraph=True, dynamic=False)
    hidden = torch.randn(1, tts.args.hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for settings, uniform in ((torch.tensor([0.8, 1.05, 1.0]), 0.3), (torch.tensor([1.0, 1.2, 0.0]), 0.9),
                                  (torch.tensor([1.0, 1.05, 0.0]), -1.0)):
            recent_codes, uniform = torch.tensor([3, -1, 3, 7]), torch.tensor([uniform])
            assert int(compiled_sampler(hidden, settings, recent_codes, uniform)) == \
                int(tts.sample_code(hidden, settings, recent_codes, uniform))
