"""SwiGLU activation: out = silu(gate) * up, computed in float32, returned in gate.dtype.

The kernel reads gate and up through their own row strides, so the two halves of one fused
[..., 2F] projection output are consumed in place without a copy.
"""

from __future__ import annotations

import torch

from workers.kernels._dispatch import as_rows, row_block_and_warps, tl, triton, triton_runs_on

# Column tile of one program: wide enough for 16-byte loads per thread, small enough to give a
# single decode row (F = 12288) a dozen programs instead of one.
_MAX_BLOCK = 1024


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch silu(gate) * up; the definition the kernel is tested against."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(
        gate_ptr, up_ptr, out_ptr, gate_row_stride, up_row_stride, out_row_stride, n_cols,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate_rows = as_rows(gate)
    up_rows = as_rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    out_rows = out.view(-1, gate.shape[-1])
    n_rows, n_cols = gate_rows.shape
    if n_rows > 0:
        block = min(row_block_and_warps(n_cols)[0], _MAX_BLOCK)
        grid = (n_rows, triton.cdiv(n_cols, block))
        _silu_mul_kernel[grid](
            gate_rows, up_rows, out_rows, gate_rows.stride(0), up_rows.stride(0), out_rows.stride(0),
            n_cols, BLOCK=block, num_warps=4,
        )
    return out


@torch.library.custom_op("omni::silu_mul", mutates_args=())
def silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Custom op: the Triton kernel where it can run, else the reference (always a fresh contiguous tensor)."""
    if triton_runs_on(gate.device):
        return _silu_mul_triton(gate, up)
    return silu_mul_reference(gate, up).contiguous()


@silu_mul_op.register_fake
def _silu_mul_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate.new_empty(gate.shape)
