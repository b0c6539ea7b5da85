"""Decode-step matrix-vector products: out = x @ weight.T for a single row x, optionally with SwiGLU.

A decode step multiplies one activation row by every weight matrix of the model, so its time is the
time to stream the weights from memory. cuBLAS picks split-K kernels for some of these shapes, with a
second reduction kernel, and reaches well under the memory bandwidth on others (bench/kernels.py).
This kernel gives each program `BLOCK_N` weight rows, walks them along K in `BLOCK_K` tiles with
fp32 partial sums, and reduces once at the end: one kernel per product, every weight byte read once.

`SWIGLU` fuses the MLP's activation into the down projection: x is the gate/up projection output
[2F] (gate half first), and each tile computes silu(gate) * up (rounded to x's dtype, as the unfused
path stores it) before multiplying, so the [F] activation is never written out.

Two more fusions remove the small kernels between the products of a decoder layer:
- `NORM` (prologue): out = rms_norm(x) @ weight.T. Every program first sums x's squares itself (x is one
  row of a few KB, read from L2), then normalises each tile as the RMSNorm kernel does (fp32, one rounding);
- `RESIDUAL` (epilogue): out = residual + x @ weight.T, the product rounded to the output dtype before the
  add, as the unfused `residual + linear(x)` rounds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.kernels._dispatch import tl, triton, triton_runs_on
from workers.kernels.rmsnorm import rms_norm_reference

# (BLOCK_N, BLOCK_K, num_warps) per weight shape (N, K); others use DEFAULT_CONFIG. Each is the best of
# `python -m bench.kernels --sweep-gemv` on an H200 (bench/results/gemv_sweep_h200.json).
GEMV_CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {
    # LLM (Qwen3-8B): q/k/v, o, gate/up, down (SwiGLU), LM head
    (6144, 4096): (2, 1024, 4),
    (4096, 4096): (1, 1024, 4),
    (24576, 4096): (2, 1024, 4),
    (4096, 12288): (8, 1024, 4),
    (151748, 4096): (2, 1024, 4),
    # TTS (Llama-300M shaped): q/k/v, o, gate/up, down (SwiGLU), code head
    (2304, 768): (2, 1024, 4),
    (768, 768): (2, 1024, 4),
    (6144, 768): (8, 128, 8),
    (768, 3072): (2, 1024, 8),
    (6562, 768): (2, 1024, 4),
}
DEFAULT_CONFIG = (2, 1024, 4)
# With the RMSNorm prologue (compile.decode_fusion) every program redoes the reduction over x before its
# first weight tile, so the best tiles differ: the sweep's `gemv_norm` rows, same file.
NORM_CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {
    (6144, 4096): (2, 1024, 4),
    (24576, 4096): (4, 512, 4),
    (2304, 768): (2, 1024, 4),
    (6144, 768): (16, 512, 4),
}
NORM_DEFAULT_CONFIG = (8, 512, 4)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                   eps: float = 0.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Torch [residual +] (rms_norm(x) if norm_weight is given, else x) @ weight.T; the definition the
    kernel is tested against."""
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps)
    out = F.linear(x, weight)
    return out if residual is None else residual + out


def swiglu_gemv_reference(gate_up: torch.Tensor, weight: torch.Tensor,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
    """Torch [residual +] (silu(gate) * up) @ weight.T, with gate/up the two halves of gate_up's last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    activation = (F.silu(gate.float()) * up.float()).to(gate_up.dtype)
    out = F.linear(activation, weight)
    return out if residual is None else residual + out


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, weight_ptr, out_ptr, norm_weight_ptr, residual_ptr, n_rows, n_cols, weight_row_stride, eps,
        SWIGLU: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        row_ptrs = weight_ptr + rows.to(tl.int64)[:, None] * weight_row_stride
        inv_rms = 1.0
        if NORM:
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                v = tl.load(x_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                squares += v * v
            inv_rms = tl.rsqrt(tl.sum(squares, axis=0) / n_cols + eps)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_mask = cols < n_cols
            if SWIGLU:
                gate = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                up = tl.load(x_ptr + n_cols + cols, mask=col_mask, other=0.0).to(tl.float32)
                x = (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
            else:
                x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            if NORM:
                scale = tl.load(norm_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                x = (x * inv_rms * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(row_ptrs + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
        if RESIDUAL:
            residual = tl.load(residual_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            out = out.to(out_ptr.dtype.element_ty).to(tl.float32) + residual
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask)


def gemv_config(n_rows: int, n_cols: int, norm: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a weight of n_rows x n_cols, with or without the norm prologue."""
    if norm:
        return NORM_CONFIGS.get((n_rows, n_cols), NORM_DEFAULT_CONFIG)
    return GEMV_CONFIGS.get((n_rows, n_cols), DEFAULT_CONFIG)


def launch_gemv(x: torch.Tensor, weight: torch.Tensor, swiglu: bool,
                config: tuple[int, int, int] | None = None, norm_weight: torch.Tensor | None = None,
                eps: float = 0.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel on one contiguous row x ([K], or [2K] with `swiglu`), optionally with the RMSNorm
    prologue (`norm_weight` [K], not with `swiglu`) and the residual epilogue (`residual` [N], contiguous);
    returns [N] in x.dtype."""
    n_rows, n_cols = weight.shape
    block_n, block_k, num_warps = config or gemv_config(n_rows, n_cols, norm=norm_weight is not None)
    out = torch.empty(n_rows, dtype=x.dtype, device=x.device)
    # Pointers a disabled prologue / epilogue never reads.
    norm_ptr = x if norm_weight is None else norm_weight
    residual_ptr = out if residual is None else residual
    _gemv_kernel[(triton.cdiv(n_rows, block_n),)](
        x, weight, out, norm_ptr, residual_ptr, n_rows, n_cols, weight.stride(0), eps,
        SWIGLU=swiglu, NORM=norm_weight is not None, RESIDUAL=residual is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out


def _contiguous_row(tensor: torch.Tensor) -> torch.Tensor:
    row = tensor.reshape(-1)
    return row if row.stride(0) == 1 else row.contiguous()


def _gemv_triton(x: torch.Tensor, weight: torch.Tensor, swiglu: bool, norm_weight: torch.Tensor | None = None,
                 eps: float = 0.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = launch_gemv(_contiguous_row(x), weight, swiglu, norm_weight=norm_weight, eps=eps,
                      residual=None if residual is None else _contiguous_row(residual))
    return out.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("omni::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """Custom op: x [..., K] holding one row, weight [N, K] -> [residual +] (rms_norm(x) if norm_weight is
    given, else x) @ weight.T, [..., N] (Triton where it runs)."""
    if triton_runs_on(x.device):
        return _gemv_triton(x, weight, swiglu=False, norm_weight=norm_weight, eps=eps, residual=residual)
    return gemv_reference(x, weight, norm_weight, eps, residual).contiguous()


@gemv_op.register_fake
def _gemv_fake(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
               eps: float = 0.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("omni::swiglu_gemv", mutates_args=())
def swiglu_gemv_op(gate_up: torch.Tensor, weight: torch.Tensor,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """Custom op: gate_up [..., 2F] holding one row, weight [N, F] -> [residual +] (silu(gate) * up) @ weight.T."""
    if triton_runs_on(gate_up.device):
        return _gemv_triton(gate_up, weight, swiglu=True, residual=residual)
    return swiglu_gemv_reference(gate_up, weight, residual).contiguous()


@swiglu_gemv_op.register_fake
def _swiglu_gemv_fake(gate_up: torch.Tensor, weight: torch.Tensor,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
    return gate_up.new_empty(*gate_up.shape[:-1], weight.shape[0])
