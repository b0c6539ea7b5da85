"""Fused residual add + RMSNorm: new_residual = x + residual; normed = rms_norm(new_residual).

Saves a full read and write of the hidden state per decoder sub-layer compared with an add
followed by a norm. The sum is rounded to x.dtype before it is normalized, exactly as the unfused
pair of operations does, so the two paths agree bit for bit up to the norm's own rounding.
"""

from __future__ import annotations

import torch

from workers.kernels._dispatch import as_rows, launch_per_row, tl, triton, triton_runs_on
from workers.kernels.rmsnorm import rms_norm_reference


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch residual add + RMSNorm; returns (normed, new_residual)."""
    new_residual = x + residual
    return rms_norm_reference(new_residual, weight, eps), new_residual


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
        x_row_stride, residual_row_stride, out_row_stride, n_cols, eps, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        total = (x + residual.to(tl.float32)).to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * out_row_stride + cols, total, mask=mask)
        total32 = total.to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(total32 * total32, axis=0) / n_cols + eps)
        out = total32 * inv_rms * weight
        tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x_rows = as_rows(x)
    residual_rows = as_rows(residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out_rows = out.view(-1, x.shape[-1])
    n_rows, n_cols = x_rows.shape
    launch_per_row(
        _add_rms_norm_kernel, n_rows, n_cols,
        x_rows, residual_rows, weight.contiguous(), out_rows, new_residual.view(-1, n_cols),
        x_rows.stride(0), residual_rows.stride(0), out_rows.stride(0), n_cols, eps,
    )
    return out, new_residual


@torch.library.custom_op("omni::add_rms_norm", mutates_args=())
def add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom op: the Triton kernel where it can run, else the reference (fresh contiguous tensors)."""
    if triton_runs_on(x.device):
        return _add_rms_norm_triton(x, residual, weight, eps)
    normed, new_residual = add_rms_norm_reference(x, residual, weight, eps)
    return normed.contiguous(), new_residual.contiguous()


@add_rms_norm_op.register_fake
def _add_rms_norm_fake(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)
