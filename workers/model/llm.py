"""Qwen3 language model (MODEL.md §2.1-2.3): state-dict prefix `llm.`, static multi-slot KV cache.

`Qwen3ForCausalLM.model` is the backbone that gets compiled; `embed` and `logits` stay outside it so
the LM head runs on the one position that is sampled (MODEL.md §6 #8).
"""

from __future__ import annotations

from torch import Tensor, nn

from workers.model.layers import Decoder, init_module_weights, linear
from workers.model.presets import LLMArgs


class Qwen3Model(Decoder):
    """`llm.model`: embed_tokens, layers (per-head q/k RMSNorm, GQA, no biases), norm."""

    def __init__(self, args: LLMArgs) -> None:
        super().__init__(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                         kv_heads=args.kv_heads, head_dim=args.head_dim, ffn=args.ffn, eps=args.rms_eps,
                         rope_theta=args.rope_theta, max_positions=args.max_positions, qk_norm=True)


class Qwen3ForCausalLM(nn.Module):
    """`llm.`: the backbone plus `lm_head` (tied to `model.embed_tokens` when args.tie_embeddings)."""

    def __init__(self, args: LLMArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Qwen3Model(args)
        self.lm_head = nn.Linear(args.hidden, args.vocab, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share `lm_head.weight` with `model.embed_tokens.weight` when args.tie_embeddings.

        Call again after `to_empty()` or `load_state_dict(assign=True)`: both replace parameters one by one.
        """
        if self.args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self) -> None:
        """Random init (MODEL.md §2.4), re-tying the head first so it shares the embedding's values."""
        self.tie_weights()
        init_module_weights(self)
        self.model.init_rope_tables()

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids [T] -> input embeddings [1, T, H]."""
        return self.model.embed_tokens(ids).unsqueeze(0)

    def logits(self, hidden_last: Tensor) -> Tensor:
        """LM head on one position: post-norm hidden [1, H] -> float32 logits [1, V]."""
        return linear(hidden_last, self.lm_head.weight).float()

    def forward(self, x: Tensor, input_pos: Tensor, slot: int, kv_len: int) -> Tensor:
        """Backbone forward (see `Decoder.forward`); returns post-norm hidden [1, T, H], no logits."""
        return self.model(x, input_pos, slot, kv_len)

