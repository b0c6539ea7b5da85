"""Triton kernels for the model runtime, each beside its torch reference, registered as custom ops.

The model layers call the functions below. Each one runs its `omni::*` custom op (Triton) when the
kernels are enabled and the tensor lives where Triton runs (CUDA), and the torch reference otherwise.
The custom ops have fake implementations, so they trace into torch.compile graphs (CUDA graphs
included) as single opaque calls.
"""

from __future__ import annotations

import torch

from workers.kernels._dispatch import (
    DECODE_ATTENTION,
    DECODE_FUSION,
    GEMV,
    TRITON_KERNELS,
    KernelSwitch,
    set_interpret,
    use_triton,
)
from workers.kernels.add_rmsnorm import add_rms_norm_op, add_rms_norm_reference
from workers.kernels.compile_cache import source_fingerprint, tag_compile_caches
from workers.kernels.flash_decoding import decode_attention_op, decode_attention_reference, visible_keys
from workers.kernels.gemv import gemv_op, gemv_reference, swiglu_gemv_op, swiglu_gemv_reference
from workers.kernels.rmsnorm import rms_norm_op, rms_norm_reference
from workers.kernels.rope_cache import qk_norm_rope_cache_op, qk_norm_rope_cache_reference
from workers.kernels.swiglu import silu_mul_op, silu_mul_reference

__all__ = [
    "DECODE_ATTENTION",
    "DECODE_FUSION",
    "GEMV",
    "TRITON_KERNELS",
    "KernelSwitch",
    "add_rms_norm",
    "add_rms_norm_reference",
    "decode_attention",
    "decode_attention_reference",
    "gemv",
    "gemv_reference",
    "qk_norm_rope_cache",
    "qk_norm_rope_cache_reference",
    "rms_norm",
    "rms_norm_reference",
    "set_interpret",
    "silu_mul",
    "silu_mul_reference",
    "swiglu_gemv",
    "swiglu_gemv_reference",
    "use_decode_fusion",
    "use_gemv",
    "use_triton",
    "visible_keys",
]

# Every graph this process compiles is cached under a key that includes this package's source, so no cached
# graph outlives a change of an omni:: op (see compile_cache.py).
tag_compile_caches(source_fingerprint())


def _check_norm_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (any number of leading dims); result in x.dtype."""
    _check_norm_weight(x, weight)
    if use_triton(x):
        return rms_norm_op(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm; returns (rms_norm(x + residual), x + residual)."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(
            f"x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} {residual.dtype} must match"
        )
    _check_norm_weight(x, weight)
    if use_triton(x):
        return add_rms_norm_op(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU: silu(gate) * up. With `up` omitted, `gate` is one fused [..., 2F] tensor (gate half first)."""
    if up is None:
        if gate.shape[-1] % 2 != 0:
            raise ValueError(f"a fused gate/up tensor needs an even last dim, got {gate.shape[-1]}")
        half = gate.shape[-1] // 2
        gate, up = gate[..., :half], gate[..., half:]
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    if use_triton(gate):
        return silu_mul_op(gate, up)
    return silu_mul_reference(gate, up)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, input_pos: torch.Tensor
) -> torch.Tensor:
    """Attention of the query at position input_pos ([1] or 0-dim) over the first kv_len cache positions.

    q [1, kv_heads, groups, D], keys/values [1, kv_heads, kv_len, D] (any strides); key j is visible
    iff j <= input_pos. Runs the Triton op only where `use_triton(q)` holds and the decode-attention
    switch is on; the reference otherwise.
    """
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"q must be [1, kv_heads, groups, D], got {tuple(q.shape)}")
    keys_match = keys.dim() == 4 and keys.shape[:2] == q.shape[:2] and keys.shape[3] == q.shape[3]
    if not keys_match or values.shape != keys.shape or keys.dtype != q.dtype or values.dtype != q.dtype:
        raise ValueError(
            f"keys {tuple(keys.shape)} {keys.dtype} and values {tuple(values.shape)} {values.dtype} must be "
            f"[1, kv_heads, kv_len, D] matching q {tuple(q.shape)} {q.dtype}"
        )
    if input_pos.numel() != 1:
        raise ValueError(f"input_pos must hold one position, got shape {tuple(input_pos.shape)}")
    if use_triton(q) and DECODE_ATTENTION.is_on():
        return decode_attention_op(q, keys, values, input_pos)
    return decode_attention_reference(q, keys, values, input_pos)


def use_gemv(x: torch.Tensor) -> bool:
    """Whether a product with x [..., K] goes through the GEMV kernel: one row, kernels and GEMV on."""
    return x.numel() == x.shape[-1] and use_triton(x) and GEMV.is_on()


def use_decode_fusion(x: torch.Tensor) -> bool:
    """Whether a decode step with x [..., K] folds its RMSNorms and residual adds into the GEMV kernels."""
    return use_gemv(x) and DECODE_FUSION.is_on()


def _check_residual(residual: torch.Tensor | None, x: torch.Tensor, rows: int) -> None:
    if residual is not None and (residual.shape != (*x.shape[:-1], rows) or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match the output "
                         f"{(*x.shape[:-1], rows)} {x.dtype}")


def gemv(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """[residual +] (rms_norm(x, norm_weight, eps) if norm_weight is given, else x) @ weight.T for x [..., K]
    holding one row and weight [N, K]; call where `use_gemv(x)` holds."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.dtype != x.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not match x {tuple(x.shape)} {x.dtype}")
    if norm_weight is not None:
        _check_norm_weight(x, norm_weight)
        norm_weight = norm_weight.contiguous()
    _check_residual(residual, x, weight.shape[0])
    return gemv_op(x, weight, norm_weight, eps, residual)


def swiglu_gemv(gate_up: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """[residual +] (silu(gate) * up) @ weight.T for gate_up [..., 2F] (gate half first) holding one row,
    weight [N, F]; call where `use_gemv(gate_up)` holds."""
    if weight.dim() != 2 or 2 * weight.shape[1] != gate_up.shape[-1] or weight.dtype != gate_up.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not match gate/up "
                         f"{tuple(gate_up.shape)} {gate_up.dtype}")
    _check_residual(residual, gate_up, weight.shape[0])
    return swiglu_gemv_op(gate_up, weight, residual)


def qk_norm_rope_cache(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None,
                       eps: float, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot: int, input_pos: torch.Tensor, heads: int) -> torch.Tensor:
    """A decode step's q/k norms (both weights or neither), rotations and K/V write in one kernel:
    qkv [..., (heads + 2 * kv_heads) * D] holding one row -> rotated queries [heads, D]; K/V of position
    input_pos ([1]) land in `slot` of k/v_cache [slots, kv_heads, max_len, D]. Call where
    `use_decode_fusion(qkv)` holds. The kernel does not bounds-check the position (it is on the device):
    the caller keeps it below max_len, as `DecoderRunner.forward` does."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    if qkv.numel() != (heads + 2 * kv_heads) * head_dim or head_dim & (head_dim - 1):
        raise ValueError(f"qkv {tuple(qkv.shape)} is not one row of {heads} + 2 x {kv_heads} heads of a "
                         f"power-of-2 size {head_dim}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("pass both q/k norm weights or neither")
    if q_norm_weight is not None:
        if q_norm_weight.shape != (head_dim,) or k_norm_weight.shape != (head_dim,):
            raise ValueError(f"q/k norm weights must be [{head_dim}]")
        q_norm_weight, k_norm_weight = q_norm_weight.contiguous(), k_norm_weight.contiguous()
    if v_cache.shape != k_cache.shape or k_cache.dtype != qkv.dtype or not k_cache.is_contiguous():
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} {k_cache.dtype} must match "
                         f"and be contiguous in {qkv.dtype}")
    if input_pos.numel() != 1 or cos.numel() != head_dim // 2 or sin.numel() != head_dim // 2:
        raise ValueError("one position and its cos/sin row of head_dim // 2 values are needed")
    return qk_norm_rope_cache_op(qkv, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, slot,
                                 input_pos, heads)
