"""The per-step heads of the two decoders as fixed-shape calls, for `fast` mode.

* LLM: LM head + the decode rule (`workers/engine/decoding.py`) on the last hidden state -> the next id;
* TTS: code head + sampling (`MiniCPMTTS.sample_code`) -> the next speech code.

Each is one `CapturedCall` shared by every session of the worker: on CUDA a graph replay (captured by
`capture()` during the engine's warm-up) of the head compiled by torch.compile (Inductor fuses the rule's
passes over the vocabulary into a few kernels), instead of some twenty small kernel launches and host
syncs per step; elsewhere the same code, uncompiled, called on the same static buffers. A session's own
settings, recent-token window and random numbers are inputs, so one graph serves all of them. Settings
the graph's fixed sizes do not cover (`DecodeParams.fits_captured_rule`) go through the eager
`choose_token` instead. These calls serve a head on its own (after a prefill, the first TTS code); a decode
step with its head is one call of `workers/engine/token_steps.py`, which runs the same compiled functions
(`llm_rule`, `tts_sample`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from workers.engine.decoding import (
    RULE_CALLS_MAX,
    RULE_TOP_K_MAX,
    RULE_WINDOW_MAX,
    DecodeParams,
    decode_rule,
    text_only_mask,
)
from workers.engine.graphs import CapturedCall
from workers.model.omni import OmniModel
from workers.model.tts import CODE_PENALTY_WINDOW


@dataclass
class RuleState:
    """One KV slot's inputs of the captured decode rule, at fixed addresses (the token steps' graphs read them)."""

    settings: Tensor  # float32 [2, 11]: `DecodeParams.as_tensor` of normal and of text-only steps
    ring: Tensor  # long [RULE_WINDOW_MAX]: the recent ids, -1 = empty
    uniforms: Tensor  # float32 [RULE_CALLS_MAX, 2]: the unit's random numbers, a row per rule call


class DecodeHeads:
    """The LLM and TTS step heads of one engine (see the module docstring).

    Args:
        model: the engine's model.
        logits: post-norm hidden [1, H] -> float32 logits [V] (the engine's LM head).
        forbidden, control: the engine's boolean [V] masks (`forbidden_mask`, `control_mask`).
        slots: the engine's KV slots (a `RuleState` each).
    """

    def __init__(self, model: OmniModel, logits: Callable[[Tensor], Tensor], forbidden: Tensor,
                 control: Tensor, slots: int) -> None:
        self.model, self._logits, self.forbidden, self.control = model, logits, forbidden, control
        device = control.device
        self.rule_states = [RuleState(DecodeParams().as_tensor(device).repeat(2, 1),
                                      torch.full((RULE_WINDOW_MAX,), -1, dtype=torch.long, device=device),
                                      torch.zeros(RULE_CALLS_MAX, 2, device=device)) for _ in range(slots)]
        # The head functions the calls run (compiled by `capture`); the token steps call them too.
        self.llm_rule: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] = self._llm_head_and_rule
        self.tts_sample: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] = model.tts.sample_code
        self.llm, self.tts = self._build(cuda_graph=False, pool=None)

    def reset_rule(self, slot: int, params: DecodeParams) -> RuleState:
        """The slot's rule state for a session with `params`: its settings rows, an empty ring."""
        state = self.rule_states[slot]
        state.settings.copy_(torch.stack([params.as_tensor(state.settings.device, text_only)
                                          for text_only in (False, True)]))
        state.ring.fill_(-1)
        return state

    def capture(self, pool: tuple[int, int] | None = None) -> None:
        """Compile both heads and capture them as CUDA graphs (in the warm-up, before sessions)."""
        self.llm_rule, self.tts_sample = (torch.compile(head, fullgraph=True, dynamic=False)
                                          for head in (self._llm_head_and_rule, self.model.tts.sample_code))
        self.llm, self.tts = self._build(cuda_graph=True, pool=pool)

    def _build(self, cuda_graph: bool, pool: tuple[int, int] | None) -> tuple[CapturedCall, CapturedCall]:
        device, args = self.control.device, self.model.args
        llm_examples = (
            torch.zeros(1, args.llm.hidden, device=device, dtype=self.model.llm_dtype),
            DecodeParams().as_tensor(device),
            torch.full((RULE_WINDOW_MAX,), -1, dtype=torch.long, device=device),
            torch.full((2,), 0.5, device=device),
        )
        tts_examples = (
            torch.zeros(1, args.tts.hidden, device=device, dtype=self.model.llm_dtype),
            torch.tensor([0.8, 1.05, 0.0], device=device),
            torch.full((CODE_PENALTY_WINDOW,), -1, dtype=torch.long, device=device),
            torch.full((1,), 0.5, device=device),
        )
        return (CapturedCall(self.llm_rule, llm_examples, cuda_graph=cuda_graph, pool=pool),
                CapturedCall(self.tts_sample, tts_examples, cuda_graph=cuda_graph, pool=pool))

    def _llm_head_and_rule(self, hidden_last: Tensor, settings: Tensor, recent: Tensor, uniforms: Tensor) -> Tensor:
        """hidden [1, H] -> the chosen id, long [1]."""
        return decode_rule(self._logits(hidden_last), settings, recent, self.forbidden, self.control, uniforms,
                           RULE_TOP_K_MAX, excluded=text_only_mask(settings, self.control)).reshape(1)
