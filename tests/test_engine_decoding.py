"""The duplex decode rule (MODEL.md §4, fixes of §6 #1-2) on hand-made logits."""

from __future__ import annotations

import math

import torch

from workers.engine.decoding import (
    DecodeParams,
    apply_length_penalty,
    apply_listen_scale,
    apply_repetition_penalty,
    choose_token,
    filter_top_k_top_p,
    forbidden_mask,
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
    ours = apply_repetition_penalty(logits.clone(), [10, 11, tokens.SPEAK], 2.0, reference=False)
    assert ours[10] == 1.0 and ours[11] == -4.0 and ours[tokens.SPEAK] == 2.0
    ref = apply_repetition_penalty(logits.clone(), [10, 11, tokens.SPEAK], 2.0, reference=True)
    assert ref[10] == 1.0 and ref[11] == -1.0 and ref[tokens.SPEAK] == 1.0


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = _logits(t10=3.0, t20=2.0)
    params = DecodeParams(greedy=True, repetition_penalty=2.0, length_penalty=1.0)
    assert choose_token(logits, params, [], _no_mask(), None) == 10
    assert choose_token(logits, params, [10, 10, 10], _no_mask(), None) == 20


def test_length_penalty_on_turn_eos() -> None:
    assert apply_length_penalty(_logits(**{f"t{tokens.TURN_EOS}": 2.2}), 1.1)[tokens.TURN_EOS].item() == \
        torch.tensor(2.2 / 1.1).item()
    assert apply_length_penalty(_logits(**{f"t{tokens.TURN_EOS}": -2.0}), 1.1)[tokens.TURN_EOS].item() == \
        torch.tensor(-2.0 * 1.1).item()


def test_listen_scale_is_additive_in_log_space_on_listen() -> None:
    params = DecodeParams(listen_prob_scale=0.5)
    scaled = apply_listen_scale(_logits(**{f"t{tokens.LISTEN}": -1.0}), params)
    assert math.isclose(scaled[tokens.LISTEN].item(), -1.0 + math.log(0.5), rel_tol=1e-6)
    # a probability scale: the listen probability ratio to another token halves
    before = _logits(**{f"t{tokens.LISTEN}": 1.0, "t600": 1.0})
    after = apply_listen_scale(before.clone(), params)
    ratio_before = (before.softmax(-1)[tokens.LISTEN] / before.softmax(-1)[600]).item()
    ratio_after = (after.softmax(-1)[tokens.LISTEN] / after.softmax(-1)[600]).item()
    assert math.isclose(ratio_after / ratio_before, 0.5, rel_tol=1e-4)
    reference = DecodeParams(listen_prob_scale=2.0, reference=True)
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
    values, ids = filter_top_k_top_p(logits, top_k=3, top_p=1.0)
    assert ids.tolist() == [1, 2, 3]
    values, ids = filter_top_k_top_p(logits, top_k=0, top_p=0.5)
    assert ids.tolist() == [1]  # the top token alone holds > 50 %
    values, ids = filter_top_k_top_p(logits, top_k=0, top_p=0.9)
    assert ids.tolist() == [1, 2, 3]


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
