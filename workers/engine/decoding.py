"""The duplex decode rule (MODEL.md §4) with the fixes of §6 #1-2, as pure functions on a logits row.

Order of one decode step:
1. draw from the plain softmax of the raw logits (argmax when greedy); `<|chunk_eos|>` is returned as is;
2. mask `<|tts_pad|>`, the tokenizer's bad_token_ids and `<|chunk_eos|>`;
3. repetition penalty over the recent-token window;
4. length penalty on `<|turn_eos|>` (favours longer turns);
5. listen scale and listen top-k;
6. temperature, top-k, top-p, then sample (argmax when greedy).

`reference=True` reproduces the reference's defects for A/B tests: listen scale / top-k act on
`<|im_end|>` by multiplying the raw logit, and the repetition penalty divides every recent id's logit
regardless of sign, control tokens included. Ours: `logit += ln(scale)` on `<|listen|>` and a
sign-aware penalty on text tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from common.config import SessionSettings
from workers.model import tokens


@dataclass(frozen=True)
class DecodeParams:
    """The per-session decoding settings that the decode rule reads."""

    greedy: bool = False
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    repetition_penalty: float = 1.05
    repetition_window: int = 512
    length_penalty: float = 1.1
    listen_prob_scale: float = 1.0
    listen_top_k: int | None = None
    reference: bool = False

    @classmethod
    def from_settings(cls, settings: SessionSettings) -> DecodeParams:
        return cls(
            greedy=settings.decode_mode == "greedy",
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            repetition_penalty=settings.text_repetition_penalty,
            repetition_window=settings.text_repetition_window_size,
            length_penalty=settings.length_penalty,
            listen_prob_scale=settings.listen_prob_scale,
            listen_top_k=settings.listen_top_k,
            reference=settings.reference_decode,
        )

    @property
    def listen_token(self) -> int:
        """The id that listen scaling and listen top-k act on (the reference's defect #1 uses the eos)."""
        return tokens.IM_END if self.reference else tokens.LISTEN


def forbidden_mask(vocab_size: int, bad_token_ids: Iterable[int], device: torch.device | str) -> torch.Tensor:
    """Boolean [V] mask of ids never chosen after step 1: tts_pad, bad_token_ids, chunk_eos."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    ids = [i for i in (*bad_token_ids, tokens.TTS_PAD, tokens.CHUNK_EOS) if 0 <= i < vocab_size]
    mask[torch.tensor(ids, dtype=torch.long, device=device)] = True
    return mask


def sample_token(logits: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    """Argmax, or one draw from softmax(logits).

    Sampling inverts the cumulative distribution with a single uniform number: over the full vocabulary
    this is several times cheaper on CPU than `torch.multinomial`, which draws one random number per entry.
    """
    if greedy:
        return int(torch.argmax(logits))
    cdf = torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1)
    uniform = torch.rand((), generator=generator, device=logits.device) * cdf[-1]
    return min(int(torch.searchsorted(cdf, uniform, right=True)), logits.shape[-1] - 1)


def apply_repetition_penalty(
    logits: torch.Tensor, recent_ids: Iterable[int], penalty: float, reference: bool
) -> torch.Tensor:
    """Penalise every distinct recent id (in place; returns `logits`)."""
    if penalty == 1.0:
        return logits
    vocab = logits.shape[-1]
    distinct = {i for i in recent_ids if 0 <= i < vocab and (reference or not tokens.is_control(i))}
    if not distinct:
        return logits
    ids = torch.tensor(sorted(distinct), dtype=torch.long, device=logits.device)
    values = logits[ids]
    if reference:
        logits[ids] = values / penalty
    else:
        logits[ids] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def apply_length_penalty(logits: torch.Tensor, penalty: float) -> torch.Tensor:
    """`<|turn_eos|>`: a positive logit is divided by the penalty, a negative one multiplied (in place)."""
    value = logits[tokens.TURN_EOS]
    logits[tokens.TURN_EOS] = torch.where(value > 0, value / penalty, value * penalty)
    return logits


def apply_listen_scale(logits: torch.Tensor, params: DecodeParams) -> torch.Tensor:
    """Scale the listen probability (ours: logit += ln(scale); reference: raw logit × scale), in place."""
    if params.listen_prob_scale == 1.0:
        return logits
    token = params.listen_token
    if params.reference:
        logits[token] = logits[token] * params.listen_prob_scale
    elif params.listen_prob_scale == 0.0:
        logits[token] = float("-inf")
    else:
        logits[token] = logits[token] + math.log(params.listen_prob_scale)
    return logits


def listen_in_top_k(logits: torch.Tensor, params: DecodeParams) -> bool:
    """True when listen_top_k is set and the listen token ranks among the top k logits."""
    if params.listen_top_k is None:
        return False
    rank = int((logits > logits[params.listen_token]).sum())
    return rank < params.listen_top_k


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate logits, candidate ids), best first: the top-k, then the smallest top-p nucleus."""
    k = logits.shape[-1] if top_k <= 0 else min(top_k, logits.shape[-1])
    values, ids = torch.topk(logits, k)
    if top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep = mass_before < top_p
        keep[0] = True
        values, ids = values[keep], ids[keep]
    return values, ids


def choose_token(
    logits: torch.Tensor,
    params: DecodeParams,
    recent_ids: Iterable[int],
    forbidden: torch.Tensor,
    generator: torch.Generator | None,
) -> int:
    """One decode step on a float32 logits row [V]; does not modify `logits`.

    `recent_ids` is the session's recent-token window, already limited to `params.repetition_window`.
    """
    natural = sample_token(logits, params.greedy, generator)
    if natural == tokens.CHUNK_EOS:
        return natural
    scores = logits.masked_fill(forbidden, float("-inf"))
    apply_repetition_penalty(scores, recent_ids, params.repetition_penalty, params.reference)
    if params.length_penalty != 1.0:
        apply_length_penalty(scores, params.length_penalty)
    apply_listen_scale(scores, params)
    if listen_in_top_k(scores, params):
        return params.listen_token
    if params.greedy or params.temperature <= 0.0:
        return int(torch.argmax(scores))
    values, ids = filter_top_k_top_p(scores / params.temperature, params.top_k, params.top_p)
    return int(ids[sample_token(values, greedy=False, generator=generator)])
