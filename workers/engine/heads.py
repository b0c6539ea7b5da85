"""The per-step heads of the two decoders as fixed-shape calls, for `fast` mode.

* LLM: LM head + the decode rule (`workers/engine/decoding.py`) on the last hidden state -> the next id;
* TTS: code head + sampling (`MiniCPMTTS.sample_code`) -> the next speech code.

Each is one `CapturedCall` shared by every session of the worker: on CUDA a graph replay (captured by
`capture()` during the engine's warm-up) of the head compiled by torch.compile (Inductor fuses the rule's
passes over the vocabulary into a few kernels), instead of some twenty small kernel launches and host
syncs per step; elsewhere the same code, uncompiled, called on the same static buffers. A session's own settings, recent-token
window and random numbers are inputs, so one graph serves all of them. Settings the graph's fixed sizes
do not cover (`DecodeParams.fits_captured_rule`) go through the eager `choose_token` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from workers.engine.decoding import RULE_TOP_K_MAX, RULE_WINDOW_MAX, DecodeParams, decode_rule, text_only_mask
from workers.engine.graphs import CapturedCall
from workers.model.omni import OmniModel
from workers.model.tts import CODE_PENALTY_WINDOW


class DecodeHeads:
    """The LLM and TTS step heads of one engine (see the module docstring).

    Args:
        model: the engine's model.
        logits: post-norm hidden [1, H] -> float32 logits [V] (the engine's LM head).
        forbidden, control: the engine's boolean [V] masks (`forbidden_mask`, `control_mask`).
    """

    def __init__(self, model: OmniModel, logits: Callable[[Tensor], Tensor], forbidden: Tensor,
                 control: Tensor) -> None:
        self.model, self._logits, self.forbidden, self.control = model, logits, forbidden, control
        self.llm, self.tts = self._build(cuda_graph=False, pool=None)

    def capture(self, pool: tuple[int, int] | None = None) -> None:
        """Compile both heads and capture them as CUDA graphs (in the warm-up, before sessions)."""
        self.llm, self.tts = self._build(cuda_graph=True, pool=pool)

    def _build(self, cuda_graph: bool, pool: tuple[int, int] | None) -> tuple[CapturedCall, CapturedCall]:
        llm_head, tts_head = self._llm_head_and_rule, self.model.tts.sample_code
        if cuda_graph:
            llm_head, tts_head = (torch.compile(head, fullgraph=True, dynamic=False) for head in (llm_head, tts_head))
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
        return (CapturedCall(llm_head, llm_examples, cuda_graph=cuda_graph, pool=pool),
                CapturedCall(tts_head, tts_examples, cuda_graph=cuda_graph, pool=pool))

    def _llm_head_and_rule(self, hidden_last: Tensor, settings: Tensor, recent: Tensor, uniforms: Tensor) -> Tensor:
        """hidden [1, H] -> the chosen id, long [1]."""
        return decode_rule(self._logits(hidden_last), settings, recent, self.forbidden, self.control, uniforms,
                           RULE_TOP_K_MAX, excluded=text_only_mask(settings, self.control)).reshape(1)
