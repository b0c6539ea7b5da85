"""MiniCPM TTS (MODEL.md §2.1-2.2, §4 "TTS per speaking unit"): state-dict prefix `tts.`.

A Llama backbone turns a condition (text-token embeddings plus projected LLM hidden states) into speech
codes, one codebook, 25 codes per second. The code loop in `generate_codes` is eager Python; each step
(`CodeSteps`) is one `model` forward (compile-friendly: static shapes for a given (T, kv_len)) plus
`sample_code`, the head and the sampling rule as fixed-shape tensor code without host synchronisation.
The host reads every code, to stop at EOS; the fast path's steps (`workers/engine/token_steps.py`) keep
the code on the device and run one step ahead of those reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from workers.model.layers import Decoder, init_module_weights, linear, round_up_kv_len
from workers.model.presets import TTSArgs

# (x [1, T, H], start_pos, slot) -> post-norm hidden [1, T, H]: how a caller runs the backbone.
BackboneCall = Callable[[Tensor, int, int], Tensor]
CODE_PENALTY_WINDOW = 16  # recent codes of one call that the frequency penalty counts
# `MiniCPMTTS.sample_code`'s signature: (hidden_last, settings, recent, uniform) -> code [1].
SamplerCall = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class LlamaModel(Decoder):
    """`tts.model`: plain multi-head attention, no q/k norm; `embed_tokens` is in the checkpoint, unused."""

    def __init__(self, args: TTSArgs) -> None:
        super().__init__(vocab=args.unused_embed_rows, hidden=args.hidden, layers=args.layers,
                         heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, ffn=args.ffn,
                         eps=args.rms_eps, rope_theta=args.rope_theta, max_positions=args.max_positions,
                         qk_norm=False)


class Projector(nn.Module):
    """linear1 -> ReLU -> linear2, with biases (`projector_semantic`, `projector_spk`)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.linear2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class MiniCPMTTS(nn.Module):
    """`tts.`: emb_text, emb_code[0], model, projector_semantic, projector_spk, head_code[0] (weight norm)."""

    def __init__(self, args: TTSArgs) -> None:
        super().__init__()
        self.args = args
        self.eos_code = args.num_audio_tokens - 1
        self.emb_text = nn.Embedding(args.num_text_tokens, args.hidden)
        self.emb_code = nn.ModuleList([nn.Embedding(args.num_audio_tokens, args.hidden)])
        self.model = LlamaModel(args)
        self.projector_semantic = Projector(args.llm_dim, args.hidden)
        self.projector_spk = Projector(args.llm_dim, args.hidden)
        head = nn.Linear(args.hidden, args.num_audio_tokens, bias=False)
        self.head_code = nn.ModuleList([weight_norm(head)])
        # Effective head matrix g * v / |v|, materialised by fold_weight_norm() (constant at inference).
        self.register_buffer("head_code_folded", None, persistent=False)
        self.register_load_state_dict_post_hook(_refresh_folded_head)

    def init_weights(self) -> None:
        """Random init (MODEL.md §2.4), rotary tables, and a refreshed folded head if one is in use."""
        init_module_weights(self)
        self.model.init_rope_tables()
        if self.head_code_folded is not None:
            self.fold_weight_norm()

    @torch.no_grad()
    def fold_weight_norm(self) -> None:
        """Compute the weight-normed head matrix once; later loads and init_weights() keep it up to date."""
        self.head_code_folded = self.head_code[0].weight.detach().clone()

    def code_logits(self, hidden_last: Tensor) -> Tensor:
        """head_code on one position: post-norm hidden [1, hidden] -> float32 logits [1, num_audio_tokens]."""
        if self.head_code_folded is not None:
            return linear(hidden_last, self.head_code_folded).float()
        return self.head_code[0](hidden_last).float()

    def build_condition(self, text_ids: Tensor, llm_hidden: Tensor) -> Tensor:
        """Condition [1, k+1, hidden]: emb_text(id) + L2-normalised projector_semantic(hidden) per kept token,
        then emb_text(audio_bos). text_ids: LongTensor [k]; llm_hidden: [k, llm_dim] final LLM hidden states.
        """
        bos_id = torch.tensor([self.args.audio_bos_token_id], device=text_ids.device)
        parts = [self.emb_text(bos_id)]
        if text_ids.numel():
            semantic = self.projector_semantic(llm_hidden.to(self.emb_text.weight.dtype))
            parts.insert(0, self.emb_text(text_ids) + F.normalize(semantic, p=2, dim=-1))
        return torch.cat(parts, dim=0).unsqueeze(0)

    def sample_code(self, hidden_last: Tensor, settings: Tensor, recent: Tensor, uniform: Tensor) -> Tensor:
        """One code from post-norm hidden [1, hidden] -> long [1].

        settings: float32 [3] = (temperature, or 1 when 0; frequency penalty; 1 when EOS is blocked);
        recent: this call's last codes (long [window], -1 = empty); uniform: float32 [1]. Logits over
        temperature, the sign-aware frequency penalty, EOS masked while blocked, then one draw by inverting
        the cumulative softmax with `uniform` (argmax when `uniform` is negative: temperature 0).
        """
        logits = self.code_logits(hidden_last)[0] / settings[0]
        logits = frequency_penalty(logits, recent, settings[1])
        is_eos = torch.arange(logits.shape[-1], device=logits.device) == self.eos_code
        logits = torch.where(is_eos & (settings[2] > 0), float("-inf"), logits)
        cdf = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1)
        drawn = torch.searchsorted(cdf, uniform * cdf[-1], right=True).clamp(max=logits.shape[-1] - 1)
        return torch.where(uniform < 0, torch.argmax(logits), drawn)

    @torch.no_grad()
    def generate_codes(self, condition: Tensor, slot: int, start_pos: int, temperature: float, min_new: int,
                       max_new: int, generator: torch.Generator | None, penalty: float = 1.05,
                       backbone: BackboneCall | None = None, steps: CodeStepper | None = None
                       ) -> tuple[list[int], int]:
        """Prefill `condition` at positions [start_pos, ...) of `slot`, then sample up to max_new codes.

        Per step (`sample_code`): logits / temperature, sign-aware frequency penalty over the last
        CODE_PENALTY_WINDOW codes of this call, EOS masked while fewer than min_new codes exist, one draw with
        `generator` (argmax when temperature == 0). Stops at EOS (not returned) or after max_new codes; as in
        Hugging Face generate, the final sampled code is not fed. Returns (codes, next_pos): the next call of
        the same turn passes next_pos as start_pos; a new turn starts again at 0; max_new is at least 1.
        `backbone(x, start_pos, slot)` runs the prefill (an acceleration runner; by default the model
        directly) and `steps` the per-code steps (default: `CodeSteps` on the same backbone, one step at a
        time).
        """
        max_len = self.model.cache_max_len
        if max_new < 1:
            raise ValueError(f"max_new must be at least 1, got {max_new}")
        if start_pos + condition.shape[1] + max_new > max_len:
            raise ValueError(f"TTS cache too short: start {start_pos} + condition {condition.shape[1]} "
                             f"+ {max_new} codes > {max_len}; reset or enlarge the TTS cache")
        device = condition.device
        backbone = self.run_backbone if backbone is None else backbone
        steps = CodeSteps(self, backbone) if steps is None else steps
        settings = torch.tensor([[temperature if temperature > 0 else 1.0, penalty, float(blocked)]
                                 for blocked in (False, True)], device=device)
        if temperature > 0:
            uniforms = torch.rand(max_new, generator=generator, device=device)
        else:
            uniforms = torch.full((max_new,), -1.0, device=device)
        steps.start(slot, settings, uniforms)
        pos = start_pos + condition.shape[1]
        codes: list[int] = []
        try:
            pending = [steps.first(backbone(condition, start_pos, slot)[:, -1], 0 < min_new)]
            for step in range(max_new):
                # Launch up to `lookahead` steps beyond the one read next (step k feeds code k - 1 at pos + k - 1).
                while len(pending) < min(max_new, step + 1 + steps.lookahead):
                    k = len(pending)
                    pending.append(steps.next(k, pos + k - 1, k < min_new))
                code = steps.read(pending[step])
                if code == self.eos_code:
                    return codes, pos + len(codes)  # every code returned was fed
                codes.append(code)
            return codes, pos + len(codes) - 1  # the last code is not fed
        finally:
            steps.finish()

    def run_backbone(self, x: Tensor, start_pos: int, slot: int) -> Tensor:
        """The backbone called directly (`BackboneCall`): x [1, T, H] at [start_pos, start_pos + T)."""
        input_pos = torch.arange(start_pos, start_pos + x.shape[1], device=x.device)
        return self.model(x, input_pos, slot, round_up_kv_len(start_pos + x.shape[1], self.model.cache_max_len))


class CodeStepper(Protocol):
    """How `MiniCPMTTS.generate_codes` runs its per-code steps.

    The loop calls `start` with the call's settings rows (EOS allowed, EOS blocked) and random numbers, `first`
    on the prefill's last hidden state, `next` for each later code, and `read`s each code's id from what
    `first` and `next` returned; `finish` waits for what is still running. `lookahead`: how many steps the
    loop may launch beyond the one whose code it reads next.
    """

    lookahead: int

    def start(self, slot: int, settings: Tensor, uniforms: Tensor) -> None: ...

    def first(self, hidden_last: Tensor, blocked: bool) -> Any: ...

    def next(self, step: int, position: int, blocked: bool) -> Any: ...

    def read(self, pending: Any) -> int: ...

    def finish(self) -> None: ...


class CodeSteps:
    """A `CodeStepper` that runs one step at a time: feed the last code through `backbone`, then `sampler`
    (`MiniCPMTTS.sample_code`, or a captured call of it) picks the next; its code is read before the next
    step starts (`lookahead` 0). The fast path's steps keep the code on the device and run one step ahead
    (`workers.engine.token_steps.TTSTokenSteps`).
    """

    lookahead = 0

    def __init__(self, tts: MiniCPMTTS, backbone: BackboneCall, sampler: SamplerCall | None = None) -> None:
        self.tts, self.backbone = tts, backbone
        self.sampler = tts.sample_code if sampler is None else sampler

    def start(self, slot: int, settings: Tensor, uniforms: Tensor) -> None:
        self.slot, self.settings, self.uniforms = slot, settings, uniforms
        self.recent = torch.full((CODE_PENALTY_WINDOW,), -1, dtype=torch.long, device=settings.device)

    def first(self, hidden_last: Tensor, blocked: bool) -> Tensor:
        """Code 0 from the prefill's post-norm hidden [1, H]."""
        return self._sample(hidden_last, 0, blocked)

    def next(self, step: int, position: int, blocked: bool) -> Tensor:
        """Feed code step - 1 at `position`, sample code `step`."""
        hidden = self.backbone(self.tts.emb_code[0](self.code.view(1, 1)), position, self.slot)
        return self._sample(hidden[:, -1], step, blocked)

    def read(self, code: Tensor) -> int:
        return int(code)

    def finish(self) -> None:
        """Nothing runs ahead here."""

    def _sample(self, hidden_last: Tensor, step: int, blocked: bool) -> Tensor:
        code = self.sampler(hidden_last, self.settings[int(blocked)], self.recent, self.uniforms[step:step + 1])
        self.recent[step % CODE_PENALTY_WINDOW] = code[0]
        self.code = code
        return code


def frequency_penalty(logits: Tensor, recent: Tensor, penalty: Tensor | float) -> Tensor:
    """Scale logits [..., C] by penalty**count of their code in `recent` (long [W], -1 = empty): positive
    logits divided, negative multiplied. Fixed shapes: empty entries count into a spare last bin."""
    size = logits.shape[-1]
    bins = torch.where(recent < 0, size, recent)
    counts = torch.zeros(size + 1, dtype=logits.dtype, device=logits.device)
    counts = counts.index_add(0, bins, torch.ones_like(bins, dtype=logits.dtype))[:size]
    scale = torch.pow(torch.as_tensor(penalty, dtype=logits.dtype, device=logits.device), counts)
    return torch.where(logits > 0, logits / scale, logits * scale)


def _refresh_folded_head(module: MiniCPMTTS, incompatible_keys: object) -> None:
    """Load post-hook: a folded head must follow newly loaded weight-norm parameters."""
    if module.head_code_folded is not None:
        module.fold_weight_norm()
