"""Decode-step attention prologue: q/k RMSNorm, rotary embedding and the KV-cache write in one kernel.

In a decode step (one token) the fused q/k/v product is one row: `heads` query heads, then `kv_heads`
key heads, then `kv_heads` value heads, each `head_dim` wide. Unfused, the step runs the q and k norms,
the rotations of q and k and the two cache writes as separate kernels. Here one program per head does
its part: program i < heads normalises and rotates query head i into the output; program heads + j
normalises and rotates key head j and writes it, with value head j, into the caches at (slot, j,
position). The norm rounds once (as the RMSNorm kernel does) and the rotation is computed in fp32 and
rounded once (as compiled code computes it).
"""

from __future__ import annotations

import torch

from workers.kernels._dispatch import tl, triton, triton_runs_on
from workers.kernels.rmsnorm import rms_norm_reference


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [..., D] in fp32, rounded once to x.dtype (cos/sin [D // 2])."""
    half = x.shape[-1] // 2
    x32, cos32, sin32 = x.float(), cos.float(), sin.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    return torch.cat((x1 * cos32 - x2 * sin32, x2 * cos32 + x1 * sin32), dim=-1).to(x.dtype)


def qk_norm_rope_cache_reference(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None,
                                 k_norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int,
                                 input_pos: torch.Tensor, heads: int) -> torch.Tensor:
    """Torch definition: the rotated queries [heads, D]; writes K/V of `input_pos` into `slot` in place.

    qkv: one row of heads + 2 * kv_heads head vectors; q/k_norm_weight: [D] (both or neither);
    cos/sin: [1, D // 2] (the row of input_pos); k/v_cache: [slots, kv_heads, max_len, D]; input_pos: [1].
    """
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.reshape(-1).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    q, k, v = q.view(heads, head_dim), k.view(kv_heads, head_dim), v.view(kv_heads, head_dim)
    if q_norm_weight is not None:
        q, k = rms_norm_reference(q, q_norm_weight, eps), rms_norm_reference(k, k_norm_weight, eps)
    q, k = _rotate(q, cos[0], sin[0]), _rotate(k, cos[0], sin[0])
    k_cache[slot].index_copy_(1, input_pos, k[:, None])
    v_cache[slot].index_copy_(1, input_pos, v[:, None])
    return q


if triton is not None:

    @triton.jit
    def _qk_norm_rope_cache_kernel(
        qkv_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
        slot_offset, head_stride, position_stride, heads, kv_heads, eps,
        HEAD_DIM: tl.constexpr, QK_NORM: tl.constexpr,
    ):
        head = tl.program_id(0)
        is_query = head < heads
        half: tl.constexpr = HEAD_DIM // 2
        offs = tl.arange(0, HEAD_DIM)
        partner = tl.where(offs < half, offs + half, offs - half)  # the other half of the rotation pair
        row = qkv_ptr + head * HEAD_DIM
        x = tl.load(row + offs).to(tl.float32)
        x_partner = tl.load(row + partner).to(tl.float32)
        if QK_NORM:
            inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / HEAD_DIM + eps)
            scale = tl.where(is_query, tl.load(q_norm_ptr + offs), tl.load(k_norm_ptr + offs)).to(tl.float32)
            scale_partner = tl.where(is_query, tl.load(q_norm_ptr + partner),
                                     tl.load(k_norm_ptr + partner)).to(tl.float32)
            x = (x * inv_rms * scale).to(qkv_ptr.dtype.element_ty)
            x_partner = (x_partner * inv_rms * scale_partner).to(qkv_ptr.dtype.element_ty)
        angle = offs % half
        cos = tl.load(cos_ptr + angle).to(tl.float32)
        sin = tl.load(sin_ptr + angle).to(tl.float32)
        sign = tl.where(offs < half, -1.0, 1.0)
        rotated = (x.to(tl.float32) * cos + sign * x_partner.to(tl.float32) * sin).to(qkv_ptr.dtype.element_ty)
        query_width = tl.where(is_query, HEAD_DIM, 0)  # a program writes q, or K and V: masks by width
        tl.store(q_out_ptr + head * HEAD_DIM + offs, rotated, mask=offs < query_width)
        # Key / value head j (programs heads .. heads + kv_heads - 1).
        kv_head = tl.where(is_query, 0, head - heads)
        position = tl.load(pos_ptr).to(tl.int64)
        cache_at = slot_offset + kv_head.to(tl.int64) * head_stride + position * position_stride + offs
        is_key = offs < HEAD_DIM - query_width
        tl.store(k_cache_ptr + cache_at, rotated, mask=is_key)
        value = tl.load(qkv_ptr + (heads + kv_heads + kv_head) * HEAD_DIM + offs, mask=is_key, other=0.0)
        tl.store(v_cache_ptr + cache_at, value, mask=is_key)


def _qk_norm_rope_cache_triton(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None,
                               k_norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                               sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int,
                               input_pos: torch.Tensor, heads: int) -> torch.Tensor:
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    row = qkv.reshape(-1)
    row = row if row.stride(0) == 1 else row.contiguous()
    q_out = torch.empty(heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    norm = q_norm_weight is not None
    _qk_norm_rope_cache_kernel[(heads + kv_heads,)](
        row, q_norm_weight if norm else row, k_norm_weight if norm else row, cos.reshape(-1).contiguous(),
        sin.reshape(-1).contiguous(), input_pos, q_out, k_cache, v_cache,
        slot * k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), heads, kv_heads, eps,
        HEAD_DIM=head_dim, QK_NORM=norm, num_warps=1 if head_dim <= 64 else 2,
    )
    return q_out


@torch.library.custom_op("omni::qk_norm_rope_cache", mutates_args=("k_cache", "v_cache"))
def qk_norm_rope_cache_op(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None,
                          k_norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, input_pos: torch.Tensor,
                          heads: int) -> torch.Tensor:
    """Custom op of `qk_norm_rope_cache_reference` (Triton where it runs); mutates the two caches."""
    run = _qk_norm_rope_cache_triton if triton_runs_on(qkv.device) else qk_norm_rope_cache_reference
    return run(qkv, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, slot, input_pos, heads)


@qk_norm_rope_cache_op.register_fake
def _qk_norm_rope_cache_fake(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None,
                             k_norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                             sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int,
                             input_pos: torch.Tensor, heads: int) -> torch.Tensor:
    return qkv.new_empty(heads, k_cache.shape[3])
