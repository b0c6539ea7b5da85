"""Flow half of the built-in token2wav (MODEL.md §7): 25 Hz speech codes -> 80-bin mel at 50 frames/s.

Code embedding -> pre-look-ahead convolution (each code sees `lookahead` future codes) -> causal conformer
encoder with x2 upsampling (its output `mu` is the flow's condition) -> conditional flow matching: an Euler
ODE over `flow_steps` steps of a DiT estimator with adaLN timestep conditioning, conditioned on `mu`, a
speaker vector and the prompt mel.

Streaming with fixed shapes: every call sees the same window of codes (and frames), and every cache has a
fixed length. How much of the window is final ("emitted") varies per call, so caches advance by a
device-side count through `take` (an `index_select` at a tensor offset): no host sync, no variable-length
tensors, nothing that stops a CUDA graph capture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.model.layers import apply_rope, rope_cos_sin
from workers.model.presets import Token2WavArgs

FRAMES_PER_CODE = 2  # the encoder upsamples 25 Hz codes to 50 mel frames/s
ENCODER_CODE_HISTORY = 50  # cached positions of the code-rate encoder layers (2 s)
ENCODER_FRAME_HISTORY = 100  # cached positions of the frame-rate encoder layers (2 s)
CONV_KERNEL = 15  # depthwise kernel of the conformer convolution module
ENCODER_FFN_MULT = 4
ESTIMATOR_FFN_MULT = 2
TIME_EMBED_DIM = 256
NOISE_FRAMES = 3000  # fixed ODE start noise, indexed by frame position (60 s before it repeats)
ROPE_THETA = 10000.0


def take(x: Tensor, start: Tensor | int, length: int, dim: int) -> Tensor:
    """`length` entries of `x` along `dim` from `start` (a 0-dim device tensor: no host sync)."""
    index = torch.arange(length, device=x.device) + start
    return x.index_select(dim, index)


def streaming_mask(past_valid: Tensor, window: int, window_valid: Tensor | None = None) -> Tensor:
    """Boolean attention mask [window, past + window]: the valid cached keys, then causal window keys.

    `window_valid` masks padded window keys (used when a padded prompt is the window). A query always
    sees its own key, so no row is fully masked.
    """
    index = torch.arange(window, device=past_valid.device)
    allowed = index[None, :] <= index[:, None]
    if window_valid is not None:
        allowed = allowed & (window_valid[None, :] | (index[None, :] == index[:, None]))
    return torch.cat([past_valid[None, :].expand(window, -1), allowed], dim=1)


def rotary(positions: Tensor, head_dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables [T, head_dim // 2] for absolute positions (computed in fp32, cast to `dtype`)."""
    cos, sin = rope_cos_sin(positions, head_dim, ROPE_THETA)
    return cos.to(dtype), sin.to(dtype)


class CausalConv1d(nn.Conv1d):
    """Convolution whose left context comes from a cache of the previous inputs (output length = input)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, groups=groups)
        self.context = kernel_size - 1

    def forward(self, x: Tensor, cache: Tensor, advance: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """x [B, C, T], cache [B, C, context] -> (output [B, C_out, T], cache after `advance` inputs)."""
        joined = torch.cat([cache, x], dim=2)
        return super().forward(joined), take(joined, advance, self.context, dim=2)


class CachedSelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions over cached keys/values plus the current window."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, past: Sequence[Tensor],
                keep_start: Tensor | int, keep_length: int) -> tuple[Tensor, Tensor]:
        """x [B, T, D]; past: cached key/value blocks [B, 2, H, L_i, hd] in key order.

        Returns the output [B, T, D] and `keep_length` entries of the joined keys/values (past blocks
        then window) starting at `keep_start`: the caller's next cache.
        """
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope
        joined = torch.cat([*past, torch.stack([apply_rope(k, cos, sin), v], dim=1)], dim=3)
        out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), joined[:, 0], joined[:, 1], attn_mask=mask)
        new_cache = take(joined, keep_start, keep_length, dim=3)
        return self.out(out.transpose(1, 2).reshape(batch, length, -1)), new_cache


class ConformerLayer(nn.Module):
    """Pre-norm conformer block: self-attention, causal convolution module, feed-forward."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = CachedSelfAttention(dim, heads)
        self.conv_norm = nn.LayerNorm(dim)
        self.conv_in = nn.Linear(dim, 2 * dim)
        self.depthwise = CausalConv1d(dim, dim, CONV_KERNEL, groups=dim)
        self.depthwise_norm = nn.LayerNorm(dim)
        self.conv_out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ENCODER_FFN_MULT * dim), nn.SiLU(),
                                 nn.Linear(ENCODER_FFN_MULT * dim, dim))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, kv_cache: Tensor,
                conv_cache: Tensor, advance: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] -> (x, next kv cache, next conv cache); caches advance by `advance` positions."""
        h, kv_cache = self.attn(self.attn_norm(x), rope, mask, (kv_cache,), advance, kv_cache.size(3))
        x = x + h
        h = F.glu(self.conv_in(self.conv_norm(x)), dim=-1)
        h, conv_cache = self.depthwise(h.transpose(1, 2), conv_cache, advance)
        x = x + self.conv_out(F.silu(self.depthwise_norm(h.transpose(1, 2))))
        x = x + self.ffn(self.ffn_norm(x))
        return x, kv_cache, conv_cache


def run_conformer_stack(layers: nn.ModuleList, x: Tensor, first_position: Tensor, advance: Tensor,
                        kv_cache: Tensor, conv_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run layers over a window starting at `first_position`; caches are stacked over layers.

    The cache holds the last `history` positions, right-aligned: slots before the turn's first position
    are invalid.
    """
    if len(layers) == 0:
        return x, kv_cache, conv_cache
    history = kv_cache.size(-2)
    slots = torch.arange(history, device=x.device)
    mask = streaming_mask(slots >= history - first_position.clamp(max=history), x.size(1))
    positions = first_position + torch.arange(x.size(1), device=x.device)
    rope = rotary(positions, layers[0].attn.head_dim, x.dtype)
    kv_caches, conv_caches = [], []
    for index, layer in enumerate(layers):
        x, layer_kv, layer_conv = layer(x, rope, mask, kv_cache[index], conv_cache[index], advance)
        kv_caches.append(layer_kv)
        conv_caches.append(layer_conv)
    return x, torch.stack(kv_caches), torch.stack(conv_caches)


class FlowEncoder(nn.Module):
    """Codes -> pre-look-ahead conv -> conformer (code rate) -> x2 upsample -> conformer (frame rate) -> mu."""

    def __init__(self, args: Token2WavArgs) -> None:
        super().__init__()
        dim = args.encoder_dim
        self.lookahead = args.lookahead
        self.heads = args.encoder_heads
        self.embed = nn.Embedding(args.num_codes, dim)
        self.lookahead_conv = nn.Conv1d(dim, dim, args.lookahead + 1)
        self.lookahead_context_conv = CausalConv1d(dim, dim, 3)
        code_rate_layers = max(1, round(0.6 * args.encoder_layers))  # 6 + 4 at full size, as CosyVoice2
        self.code_layers = nn.ModuleList(ConformerLayer(dim, args.encoder_heads) for _ in range(code_rate_layers))
        self.upsample_conv = CausalConv1d(dim, dim, 2 * FRAMES_PER_CODE + 1)
        self.frame_layers = nn.ModuleList(
            ConformerLayer(dim, args.encoder_heads) for _ in range(args.encoder_layers - code_rate_layers))
        self.out_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, args.n_mels)

    def cache_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Shapes of this encoder's per-turn caches."""
        dim, head_dim = self.embed.embedding_dim, self.embed.embedding_dim // self.heads
        code_layers, frame_layers = len(self.code_layers), len(self.frame_layers)
        return {
            "lookahead": (batch, dim, self.lookahead_context_conv.context),
            "code_kv": (code_layers, batch, 2, self.heads, ENCODER_CODE_HISTORY, head_dim),
            "code_conv": (code_layers, batch, dim, CONV_KERNEL - 1),
            "upsample": (batch, dim, self.upsample_conv.context),
            "frame_kv": (frame_layers, batch, 2, self.heads, ENCODER_FRAME_HISTORY, head_dim),
            "frame_conv": (frame_layers, batch, dim, CONV_KERNEL - 1),
        }

    def forward(self, codes: Tensor, code_valid: Tensor, emitted: Tensor, emit: Tensor,
                cache: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """codes [B, C + lookahead] (padding False in `code_valid`), `emitted` codes before this window,
        `emit` <= C of its codes final -> (mu [B, 2C, n_mels], next caches).

        The last `lookahead` codes only feed the look-ahead convolution of the first C positions.
        """
        x = self.embed(codes) * code_valid[None, :, None].to(self.embed.weight.dtype)  # padding reads as 0
        h = F.leaky_relu(self.lookahead_conv(x.transpose(1, 2)))  # position i sees codes i .. i + lookahead
        h, lookahead_cache = self.lookahead_context_conv(h, cache["lookahead"], emit)
        x = x[:, :h.size(2)] + h.transpose(1, 2)
        x, code_kv, code_conv = run_conformer_stack(
            self.code_layers, x, emitted, emit, cache["code_kv"], cache["code_conv"])
        h, upsample_cache = self.upsample_conv(
            x.repeat_interleave(FRAMES_PER_CODE, dim=1).transpose(1, 2), cache["upsample"], emit * FRAMES_PER_CODE)
        x, frame_kv, frame_conv = run_conformer_stack(
            self.frame_layers, h.transpose(1, 2), emitted * FRAMES_PER_CODE, emit * FRAMES_PER_CODE,
            cache["frame_kv"], cache["frame_conv"])
        new_cache = {"lookahead": lookahead_cache, "code_kv": code_kv, "code_conv": code_conv,
                     "upsample": upsample_cache, "frame_kv": frame_kv, "frame_conv": frame_conv}
        return self.proj(self.out_norm(x)), new_cache


def timestep_embedding(times: Tensor, dim: int) -> Tensor:
    """Sinusoidal embeddings [S, dim] of flow times in [0, 1] (scaled by 1000 like diffusion steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=times.device) / half)
    angles = 1000.0 * times.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class DiTBlock(nn.Module):
    """Transformer block whose norms are shifted, scaled and gated by the timestep (adaLN-Zero layout)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.modulation = nn.Linear(dim, 6 * dim)
        self.attn_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = CachedSelfAttention(dim, heads)
        self.ffn_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ESTIMATOR_FFN_MULT * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(ESTIMATOR_FFN_MULT * dim, dim))

    def forward(self, x: Tensor, time_emb: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
                past: Sequence[Tensor], keep_start: Tensor | int, keep_length: int) -> tuple[Tensor, Tensor]:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation(F.silu(time_emb))[:, None].chunk(6, -1)
        h, kept = self.attn(self.attn_norm(x) * (1 + scale_a) + shift_a, rope, mask, past, keep_start, keep_length)
        x = x + gate_a * h
        x = x + gate_f * self.ffn(self.ffn_norm(x) * (1 + scale_f) + shift_f)
        return x, kept


class FlowEstimator(nn.Module):
    """DiT velocity estimator: input [x_t, cond, mu, speaker] per frame, timestep via adaLN."""

    def __init__(self, args: Token2WavArgs) -> None:
        super().__init__()
        dim = args.estimator_dim
        self.heads = args.estimator_heads
        self.time_mlp = nn.Sequential(nn.Linear(TIME_EMBED_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.input_proj = nn.Linear(4 * args.n_mels, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, args.estimator_heads) for _ in range(args.estimator_blocks))
        self.final_modulation = nn.Linear(dim, 2 * dim)
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, args.n_mels)

    def forward(self, x: Tensor, mu: Tensor, speaker: Tensor, cond: Tensor, time_features: Tensor,
                rope: tuple[Tensor, Tensor], mask: Tensor, past: Sequence[Tensor], keep_start: Tensor | int,
                keep_length: int) -> tuple[Tensor, Tensor]:
        """x, mu, cond [B, T, n_mels], speaker [B, 1, n_mels], time_features [1, TIME_EMBED_DIM];
        past: key/value blocks [blocks, B, 2, H, L_i, hd].

        Returns the velocity [B, T, n_mels] and the kept keys/values [blocks, B, 2, H, keep_length, hd].
        """
        time_emb = self.time_mlp(time_features)
        h = self.input_proj(torch.cat([x, cond, mu, speaker.expand_as(x)], dim=-1))
        kept = []
        for index, block in enumerate(self.blocks):
            h, block_kept = block(h, time_emb, rope, mask, [p[index] for p in past], keep_start, keep_length)
            kept.append(block_kept)
        shift, scale = self.final_modulation(F.silu(time_emb))[:, None].chunk(2, -1)
        return self.proj_out(self.final_norm(h) * (1 + scale) + shift), torch.stack(kept)


class Flow(nn.Module):
    """Encoder + speaker projection + flow-matching ODE (fixed start noise, cosine time schedule)."""

    def __init__(self, args: Token2WavArgs) -> None:
        super().__init__()
        self.encoder = FlowEncoder(args)
        self.speaker_affine = nn.Linear(args.speaker_dim, args.n_mels)
        self.estimator = FlowEstimator(args)
        self.steps = args.flow_steps
        self.register_buffer("noise", torch.randn(args.n_mels, NOISE_FRAMES))
        times = 1.0 - torch.cos(torch.linspace(0.0, 1.0, args.flow_steps + 1, device="cpu") * math.pi / 2)
        self.step_sizes = (times[1:] - times[:-1]).tolist()  # python floats: nothing to sync per step
        time_features = timestep_embedding(times[:-1], TIME_EMBED_DIM)
        self.register_buffer("time_features", time_features.to(self.noise.device))

    def estimator_cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        """Shape of per-step estimator keys/values covering `length` frames."""
        est = self.estimator
        head_dim = est.input_proj.out_features // est.heads
        return (self.steps, len(est.blocks), batch, 2, est.heads, length, head_dim)

    def speaker_condition(self, speaker: Tensor) -> Tensor:
        """Speaker embedding [B, speaker_dim] -> per-frame condition [B, 1, n_mels]."""
        return self.speaker_affine(F.normalize(speaker, dim=-1))[:, None]

    def solve(self, mu: Tensor, speaker: Tensor, cond: Tensor, positions: Tensor, past: Sequence[Tensor],
              mask: Tensor, keep_start: Tensor | int, keep_length: int) -> tuple[Tensor, Tensor]:
        """Euler-integrate noise -> mel for frames at `positions` (mu, cond [B, T, n_mels]).

        past: per-step key/value blocks [steps, blocks, B, 2, H, L_i, hd]. Returns the mel [B, T, n_mels]
        and the kept keys/values of every step [steps, blocks, B, 2, H, keep_length, hd].
        """
        noise_index = torch.remainder(positions, self.noise.size(1))
        x = self.noise.index_select(1, noise_index).t()[None].expand_as(mu)
        head_dim = self.estimator.input_proj.out_features // self.estimator.heads
        rope = rotary(positions, head_dim, mu.dtype)
        kept = []
        for step, step_size in enumerate(self.step_sizes):
            velocity, step_kept = self.estimator(x, mu, speaker, cond, self.time_features[step:step + 1], rope,
                                                 mask, [p[step] for p in past], keep_start, keep_length)
            x = x + step_size * velocity
            kept.append(step_kept)
        return x, torch.stack(kept)
