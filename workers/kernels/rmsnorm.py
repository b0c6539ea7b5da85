"""RMSNorm: y = x * rsqrt(mean(x^2) + eps) * weight, computed in float32, returned in x.dtype.

One Triton program normalizes one row; the whole row sits in registers (block = next power of 2
of the hidden size), so x is read once and y written once.
"""

from __future__ import annotations

import torch

from workers.kernels._dispatch import as_rows, launch_per_row, tl, triton, triton_runs_on


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch RMSNorm over the last dim; the definition the kernel is tested against."""
    x32 = x.float()
    inv_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (x32 * inv_rms * weight.float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, weight_ptr, out_ptr, x_row_stride, out_row_stride, n_cols, eps, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        out = x * inv_rms * weight
        tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = as_rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out_rows = out.view(-1, x.shape[-1])
    n_rows, n_cols = rows.shape
    launch_per_row(
        _rms_norm_kernel, n_rows, n_cols,
        rows, weight.contiguous(), out_rows, rows.stride(0), out_rows.stride(0), n_cols, eps,
    )
    return out


@torch.library.custom_op("omni::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Custom op: the Triton kernel where it can run, else the reference (always a fresh contiguous tensor)."""
    if triton_runs_on(x.device):
        return _rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps).contiguous()


@rms_norm_op.register_fake
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)
