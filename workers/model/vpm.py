"""SigLIP NaViT vision transformer (`vpm.`, MODEL.md §2.1-2.3).

Patch embedding (Conv2d, stride = patch) + learned position embedding over a 70 × 70 grid indexed by
NaViT bucketed coordinates, then pre-LN encoder layers (GELU-tanh MLP, SDPA attention) and a final
LayerNorm. Only `layers_run` layers are built: the checkpoint's last configured layer
(`drop_vision_last_layer`) is never run, so it is not built either.

One forward takes a batch of images of the same size, so each (h, w) patch grid is one static shape for
torch.compile; `image.py` keeps the number of distinct grids small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.model.layers import init_module_weights
from workers.model.presets import VisionArgs


def navit_position_ids(rows: int, cols: int, grid: int) -> Tensor:
    """Position ids [rows * cols] of a rows × cols patch image on the grid × grid position table.

    Fractional coordinates i/rows and j/cols are bucketised against boundaries k/grid; the id is
    row_bucket * grid + col_bucket. Computed in float32 on the CPU with `arange` steps exactly as the
    reference does, so the rare exact ties (e.g. 15/25 = 42/70) round the same way as in training.
    """
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid, dtype=torch.float32, device="cpu")
    row_coords = torch.arange(0, 1 - 1e-6, 1 / rows, dtype=torch.float32, device="cpu")
    col_coords = torch.arange(0, 1 - 1e-6, 1 / cols, dtype=torch.float32, device="cpu")
    row_buckets = torch.bucketize(row_coords, boundaries, right=True)
    col_buckets = torch.bucketize(col_coords, boundaries, right=True)
    return (row_buckets[:, None] * grid + col_buckets[None, :]).flatten()


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.grid = args.grid
        self.patch_embedding = nn.Conv2d(3, args.hidden, kernel_size=args.patch, stride=args.patch)
        self.position_embedding = nn.Embedding(args.grid * args.grid, args.hidden)
        self._position_ids: dict[tuple[int, int, torch.device], Tensor] = {}

    @torch.compiler.disable
    def position_ids(self, rows: int, cols: int, device: torch.device) -> Tensor:
        """Cached NaViT position ids on `device` (computed once per grid; a graph break under compile)."""
        key = (rows, cols, device)
        if key not in self._position_ids:
            self._position_ids[key] = navit_position_ids(rows, cols, self.grid).to(device)
        return self._position_ids[key]

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        rows, cols = patches.shape[-2:]
        embeddings = patches.flatten(2).transpose(1, 2)
        return embeddings + self.position_embedding(self.position_ids(rows, cols, embeddings.device))


class SiglipAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, hidden = x.shape
        q, k, v = (proj(x).view(batch, length, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, hidden))


class SiglipMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.hidden, eps=args.ln_eps)
        self.self_attn = SiglipAttention(args.hidden, args.heads)
        self.layer_norm2 = nn.LayerNorm(args.hidden, eps=args.ln_eps)
        self.mlp = SiglipMLP(args.hidden, args.ffn)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(args) for _ in range(args.layers_run))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    """`vpm.`: pixel_values [N, 3, H, W] (one size, H and W multiples of the patch) -> [N, patches, hidden]."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.args = args
        self.embeddings = SiglipVisionEmbeddings(args)
        self.encoder = SiglipEncoder(args)
        self.post_layernorm = nn.LayerNorm(args.hidden, eps=args.ln_eps)

    def init_weights(self) -> None:
        """Random init (MODEL.md §2.4)."""
        init_module_weights(self)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
