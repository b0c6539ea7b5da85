"""The duplex decode rule (MODEL.md §4) with the fixes of §6 #1-2, as tensor code on a logits row.

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

One implementation, `decode_rule`, serves every path: it has no host synchronisation and no
data-dependent shapes (the settings arrive as a tensor, the window as a fixed-size id buffer padded with
-1, the two random numbers as a tensor), so the fast path captures it in a CUDA graph with the LM head,
and `choose_token` runs the same code eagerly. Random draws invert the cumulative distribution with one
uniform number each; a sampling step reads two (`draw_uniforms`). A session draws a unit's rows up front,
two per possible step, so both paths consume its generator alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from common.config import SessionSettings
from workers.model import tokens

# The captured rule's fixed sizes: a session whose top_k is 0 (whole vocabulary) or above RULE_TOP_K_MAX,
# or whose window is above RULE_WINDOW_MAX, decodes with the eager call of the same rule instead.
RULE_TOP_K_MAX = 64
RULE_WINDOW_MAX = 1024
# Rule calls per unit at most (`SessionSettings.max_new_speak_tokens_per_chunk`'s bound): the rows of random
# numbers a unit draws up front.
RULE_CALLS_MAX = 64
# Layout of the settings vector of `DecodeParams.as_tensor`.
_GREEDY, _TEMPERATURE, _TOP_K, _TOP_P, _REPETITION, _LENGTH, _LISTEN_SCALE, _LISTEN_LOG_SCALE, \
    _LISTEN_TOP_K, _REFERENCE, _TEXT_ONLY = range(11)


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

    @property
    def argmax_only(self) -> bool:
        """Greedy, or a temperature of 0: the last step is an argmax."""
        return self.greedy or self.temperature <= 0.0

    def as_tensor(self, device: torch.device | str, text_only: bool = False) -> Tensor:
        """The settings as the float32 vector `decode_rule` reads; `text_only` masks every control token
        before step 1 (the forced schedule's text steps)."""
        values = [0.0] * 11
        values[_GREEDY] = float(self.argmax_only)
        values[_TEMPERATURE] = self.temperature if self.temperature > 0.0 else 1.0
        values[_TOP_K] = float(self.top_k)
        values[_TOP_P] = self.top_p
        values[_REPETITION] = self.repetition_penalty
        values[_LENGTH] = self.length_penalty
        values[_LISTEN_SCALE] = self.listen_prob_scale
        values[_LISTEN_LOG_SCALE] = math.log(self.listen_prob_scale) if self.listen_prob_scale > 0 else -math.inf
        values[_LISTEN_TOP_K] = float(self.listen_top_k or 0)
        values[_REFERENCE] = float(self.reference)
        values[_TEXT_ONLY] = float(text_only)
        return torch.tensor(values, dtype=torch.float32, device=device)

    def candidates(self, vocab: int) -> int:
        """How many top candidates the last step keeps before top-p (the whole vocabulary for top_k 0)."""
        return vocab if self.top_k <= 0 else min(self.top_k, vocab)

    def fits_captured_rule(self) -> bool:
        """Whether the fixed sizes of the captured rule cover these settings."""
        return (self.argmax_only or 0 < self.top_k <= RULE_TOP_K_MAX) and \
            self.repetition_window <= RULE_WINDOW_MAX


def forbidden_mask(vocab_size: int, bad_token_ids: Iterable[int], device: torch.device | str) -> Tensor:
    """Boolean [V] mask of ids never chosen after step 1: tts_pad, bad_token_ids, chunk_eos."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    ids = [i for i in (*bad_token_ids, tokens.TTS_PAD, tokens.CHUNK_EOS) if 0 <= i < vocab_size]
    mask[torch.tensor(ids, dtype=torch.long, device=device)] = True
    return mask


def control_mask(vocab_size: int, device: torch.device | str) -> Tensor:
    """Boolean [V] mask of the added control tokens (`tokens.is_control`)."""
    ids = torch.arange(vocab_size, device=device)
    return (ids >= tokens.FIRST_ADDED_TOKEN) & (ids <= tokens.LAST_ADDED_TOKEN)


def draw_uniforms(params: DecodeParams, generator: torch.Generator | None, device: torch.device | str,
                  steps: int | None = None) -> Tensor:
    """The two uniform numbers of one step (float32 [2]), or of `steps` steps ([steps, 2], a row per step);
    zeros when the steps draw nothing (greedy)."""
    shape = (2,) if steps is None else (steps, 2)
    if params.greedy:
        return torch.zeros(shape, device=device)
    return torch.rand(shape, generator=generator, device=device)


def recent_window(recent_ids: Sequence[int], size: int, device: torch.device | str) -> Tensor:
    """The recent-token window as a long [size] buffer, padded with -1 (no token)."""
    ids = list(recent_ids)[-size:] if size else []
    return torch.tensor(ids + [-1] * (size - len(ids)), dtype=torch.long, device=device)


def text_only_mask(settings: Tensor, control: Tensor) -> Tensor:
    """The ids `decode_rule` excludes for `settings`: the control tokens on text-only steps, else none."""
    return control & (settings[_TEXT_ONLY] > 0)


def gather_one(values: Tensor, index: Tensor) -> Tensor:
    """values[index] for a 0-dim index tensor, on the device: plain indexing would read the index on the
    host (a synchronisation, and an error inside a CUDA-graph capture)."""
    return values.index_select(0, index.reshape(1))[0]


def sample_index(logits: Tensor, uniform: Tensor, count: Tensor | None = None) -> Tensor:
    """Index of one draw from softmax(logits) by inverting its cumulative sum with `uniform` (0-dim).

    `count` (0-dim, optional): only the first `count` entries can be drawn (the rest are -inf).
    """
    cdf = torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1)
    index = torch.searchsorted(cdf, (uniform * cdf[-1]).reshape(1), right=True)[0]
    return index.clamp(max=logits.shape[-1] - 1) if count is None else torch.minimum(index, count - 1)


def draw_lands_on(logits: Tensor, uniform: Tensor, token: int) -> Tensor:
    """0-dim bool: `sample_index(logits, uniform)` would draw `token`, found without its cumulative sum.

    The inverse-CDF draw lands on `token` iff mass(ids < token) <= uniform * total < mass(ids <= token):
    two partial sums instead of a running sum and a search over the vocabulary.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    below, target = probs[:token].sum(), uniform * probs.sum()
    return (below <= target) & (target < below + probs[token])


def apply_repetition_penalty(scores: Tensor, recent: Tensor, settings: Tensor, control: Tensor) -> Tensor:
    """Penalise every distinct id of `recent` (long [W], -1 = empty), in place on masked scores [V].

    Ours: a positive logit is divided by the penalty, a negative one multiplied, text tokens only.
    Reference: every recent id, control tokens included, divided regardless of sign.
    Empty entries point at `<|tts_pad|>`, which step 2 always masks: -inf stays -inf under any penalty,
    so every write to it agrees, as the writes of a repeated id do.
    """
    penalty, reference = settings[_REPETITION], settings[_REFERENCE] > 0
    ids = torch.where(recent < 0, tokens.TTS_PAD, recent)
    values = scores[ids]
    ours = torch.where(values > 0, values / penalty, values * penalty)
    spared = control[ids] & ~reference
    penalised = torch.where(reference, values / penalty, torch.where(spared, values, ours))
    return scores.index_put_((ids,), penalised)


def apply_length_penalty(scores: Tensor, settings: Tensor) -> Tensor:
    """`<|turn_eos|>`: a positive logit is divided by the penalty, a negative one multiplied (in place)."""
    value, penalty = scores[tokens.TURN_EOS], settings[_LENGTH]
    scores[tokens.TURN_EOS] = torch.where(value > 0, value / penalty, value * penalty)
    return scores


def listen_token(settings: Tensor) -> Tensor:
    """The id listen scaling and listen top-k act on: `<|listen|>`, or `<|im_end|>` in reference mode."""
    return torch.where(settings[_REFERENCE] > 0, tokens.IM_END, tokens.LISTEN).long()


def apply_listen_scale(scores: Tensor, settings: Tensor) -> Tensor:
    """Scale the listen probability (ours: logit += ln(scale); reference: raw logit × scale), in place."""
    token = listen_token(settings)
    value = gather_one(scores, token)
    scaled = torch.where(settings[_REFERENCE] > 0, value * settings[_LISTEN_SCALE],
                         value + settings[_LISTEN_LOG_SCALE])
    return scores.index_put_((token.reshape(1),), scaled.reshape(1))


def listen_in_top_k(scores: Tensor, settings: Tensor) -> Tensor:
    """0-dim bool: listen_top_k is set and the listen token ranks among the top k scores."""
    limit = settings[_LISTEN_TOP_K]
    rank = (scores > gather_one(scores, listen_token(settings))).sum()
    return (limit > 0) & (rank < limit)


def filter_top_k_top_p(scores: Tensor, settings: Tensor, candidates: int) -> tuple[Tensor, Tensor, Tensor]:
    """(values, ids, kept): the `candidates` best scores over the temperature, best first, with -inf beyond
    the top_k and beyond the smallest top-p nucleus; `kept` (0-dim) counts the survivors, a prefix."""
    values, ids = torch.topk(scores, candidates)
    values = values / settings[_TEMPERATURE]  # after top-k: the order is the same, on k values instead of V
    rank = torch.arange(candidates, device=scores.device)
    top_k = settings[_TOP_K]
    values = torch.where((top_k <= 0) | (rank < top_k), values, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = (mass_before < settings[_TOP_P]) | (settings[_TOP_P] >= 1.0) | (rank == 0)
    keep &= values > float("-inf")
    return torch.where(keep, values, float("-inf")), ids, keep.sum()


def decode_rule(logits: Tensor, settings: Tensor, recent: Tensor, forbidden: Tensor, control: Tensor,
                uniforms: Tensor, candidates: int, excluded: Tensor | None = None,
                greedy: bool | None = None) -> Tensor:
    """One decode step on a float32 logits row [V] -> the chosen id (0-dim long); `logits` is not modified.

    settings: `DecodeParams.as_tensor`; recent: the window (long [W], -1 = empty); forbidden / control:
    boolean [V] masks (`forbidden` must hold `<|tts_pad|>`, as `forbidden_mask` does); uniforms: float32 [2]
    (`draw_uniforms`); candidates: the top-k size of step 6 (`DecodeParams.candidates`, or a fixed bound
    in a captured graph); excluded: ids masked before step 1 (`text_only_mask`); greedy: None decides
    argmax vs sampling on the device from `settings` (a captured graph computes both and selects), a bool
    (the eager call) skips the branch that would be discarded. No host synchronisation.
    """
    def pick(argmax: Callable[[], Tensor], sample: Callable[[], Tensor]) -> Tensor:
        if greedy is None:
            return torch.where(settings[_GREEDY] > 0, argmax(), sample())
        return argmax() if greedy else sample()

    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
    natural_ends_chunk = pick(lambda: torch.argmax(logits) == tokens.CHUNK_EOS,
                              lambda: draw_lands_on(logits, uniforms[0], tokens.CHUNK_EOS))
    scores = logits.masked_fill(forbidden, float("-inf"))
    apply_repetition_penalty(scores, recent, settings, control)
    apply_length_penalty(scores, settings)
    apply_listen_scale(scores, settings)

    def sample_filtered() -> Tensor:
        values, ids, kept = filter_top_k_top_p(scores, settings, candidates)
        return gather_one(ids, sample_index(values, uniforms[1], kept))

    chosen = pick(lambda: torch.argmax(scores), sample_filtered)
    chosen = torch.where(listen_in_top_k(scores, settings), listen_token(settings), chosen)
    return torch.where(natural_ends_chunk, tokens.CHUNK_EOS, chosen)


def choose_token(logits: Tensor, params: DecodeParams, recent_ids: Sequence[int], forbidden: Tensor,
                 generator: torch.Generator | None, text_only: bool = False, control: Tensor | None = None,
                 uniforms: Tensor | None = None) -> int:
    """One decode step, called eagerly, on a float32 logits row [V]; does not modify `logits`.

    `recent_ids` is the session's recent-token window, already limited to `params.repetition_window`;
    `text_only` masks the control tokens (`control`, default: every added token) before step 1. The step's
    random numbers are `uniforms` (float32 [2], drawn earlier) when given, else drawn from `generator`.
    """
    device, vocab = logits.device, logits.shape[-1]
    control = control_mask(vocab, device) if control is None else control
    uniforms = draw_uniforms(params, generator, device) if uniforms is None else uniforms
    token = decode_rule(logits, params.as_tensor(device, text_only), recent_window(recent_ids, len(recent_ids), device),
                        forbidden, control, uniforms, params.candidates(vocab),
                        excluded=control if text_only else None, greedy=params.argmax_only)
    return int(token)
