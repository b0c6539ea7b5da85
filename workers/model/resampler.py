"""Perceiver resampler (`resampler.`, MODEL.md §2.1-2.3): any patch grid -> 64 LLM embeddings.

One cross-attention from 64 learned queries to the vision features:
    kv      = ln_kv(kv_proj(x))
    out     = attn(query = ln_q(query), key = kv + pos_2d, value = kv)
    result  = ln_post(out) @ proj
The attention parameters keep `nn.MultiheadAttention`'s names (`attn.in_proj_weight`, `attn.in_proj_bias`,
`attn.out_proj`) so checkpoints load unchanged; the math runs through SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.model.layers import INIT_STD, init_module_weights
from workers.model.presets import ResamplerArgs


def sincos_pos_table_2d(embed_dim: int, rows: int, cols: int, device: torch.device | str | None = None) -> Tensor:
    """2-D sin-cos position table [rows, cols, embed_dim] (float32).

    Layout per position (row i, column j), each part embed_dim / 4 wide:
    [sin(j·ω), cos(j·ω), sin(i·ω), cos(i·ω)] with ω_k = 10000^(-k / (embed_dim / 4)).
    The column half comes first, as in the reference (its meshgrid puts the width coordinate first).
    """
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    col_angles = torch.arange(cols, dtype=torch.float64, device=device)[:, None] * omega  # [cols, quarter]
    row_angles = torch.arange(rows, dtype=torch.float64, device=device)[:, None] * omega  # [rows, quarter]
    col_part = torch.cat([col_angles.sin(), col_angles.cos()], dim=-1)[None, :, :].expand(rows, cols, -1)
    row_part = torch.cat([row_angles.sin(), row_angles.cos()], dim=-1)[:, None, :].expand(rows, cols, -1)
    return torch.cat([col_part, row_part], dim=-1).float()


class ResamplerAttention(nn.Module):
    """Multi-head cross-attention with `nn.MultiheadAttention` parameter names (q/k/v packed in_proj)."""

    def __init__(self, embed_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """query [N, Q, E], key/value [N, L, E] -> [N, Q, E]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        batch, n_queries, embed = query.shape

        def heads(x: Tensor) -> Tensor:
            return x.view(batch, x.shape[1], self.heads, -1).transpose(1, 2)

        q = heads(F.linear(query, w_q, b_q))
        k = heads(F.linear(key, w_k, b_k))
        v = heads(F.linear(value, w_v, b_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n_queries, embed))


class Resampler(nn.Module):
    """`resampler.`: x [N, patches, kv_dim] of an h × w patch grid -> [N, queries, embed_dim]."""

    def __init__(self, args: ResamplerArgs) -> None:
        super().__init__()
        self.args = args
        self.query = nn.Parameter(torch.empty(args.queries, args.embed_dim))
        self.kv_proj = nn.Linear(args.kv_dim, args.embed_dim, bias=False)
        self.attn = ResamplerAttention(args.embed_dim, args.heads)
        self.ln_q = nn.LayerNorm(args.embed_dim, eps=args.ln_eps)
        self.ln_kv = nn.LayerNorm(args.embed_dim, eps=args.ln_eps)
        self.ln_post = nn.LayerNorm(args.embed_dim, eps=args.ln_eps)
        self.proj = nn.Parameter(torch.empty(args.embed_dim, args.embed_dim))
        self.register_buffer("pos_table", torch.empty(args.max_grid, args.max_grid, args.embed_dim),
                             persistent=False)
        self.init_pos_table()

    def init_pos_table(self, rows: int | None = None, cols: int | None = None) -> None:
        """(Re)compute the position table, at least max_grid² (needed after `to_empty()`: not in the state dict)."""
        rows = max(rows or 0, self.pos_table.shape[0])
        cols = max(cols or 0, self.pos_table.shape[1])
        table = sincos_pos_table_2d(self.args.embed_dim, rows, cols, self.pos_table.device)
        self.pos_table = table.to(self.pos_table.dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init (MODEL.md §2.4): bare matrices normal(0, 0.02), in-projection bias zero; the table."""
        init_module_weights(self)
        for matrix in (self.query, self.proj, self.attn.in_proj_weight):
            matrix.normal_(0.0, INIT_STD)
        self.attn.in_proj_bias.zero_()
        self.init_pos_table()

    def forward(self, x: Tensor, tgt_hw: tuple[int, int]) -> Tensor:
        rows, cols = tgt_hw
        if rows > self.pos_table.shape[0] or cols > self.pos_table.shape[1]:
            self.init_pos_table(rows, cols)  # grows on demand (rare: larger than the 70 × 70 grid)
        pos = self.pos_table[:rows, :cols].reshape(rows * cols, -1).to(x.dtype)
        kv = self.ln_kv(self.kv_proj(x))
        query = self.ln_q(self.query).expand(x.shape[0], -1, -1)
        out = self.attn(query, kv + pos, kv)
        return self.ln_post(out) @ self.proj
