"""Decode-step matrix-vector products: out = x @ weight.T for a single row x, optionally with SwiGLU.

A decode step multiplies one activation row by every weight matrix of the model, so its time is the
time to stream the weights from memory. cuBLAS picks split-K kernels for some of these shapes, with a
second reduction kernel, and reaches well under the memory bandwidth on others (bench/kernels.py).
This kernel gives each program `BLOCK_N` weight rows, walks them along K in `BLOCK_K` tiles with
fp32 partial sums, and reduces once at the end: one kernel per product, every weight byte read once.

`SWIGLU` fuses the MLP's activation into the down projection: x is the gate/up projection output
[2F] (gate half first), and each tile computes silu(gate) * up (rounded to x's dtype, as the unfused
path stores it) before multiplying, so the [F] activation is never written out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.kernels._dispatch import tl, triton, triton_runs_on

# (BLOCK_N, BLOCK_K, num_warps) per weight shape (N, K); others use DEFAULT_CONFIG. Hand-picked, not yet
# swept on a GPU: `python -m bench.kernels --sweep-gemv` times the grid, and its `best` belongs here. The
# H200 decode steps of docs/BENCHMARKS.md ran with these.
GEMV_CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {
    # LLM (Qwen3-8B): q/k/v, o, gate/up, down (SwiGLU), LM head
    (6144, 4096): (2, 1024, 4),
    (4096, 4096): (2, 1024, 2),
    (24576, 4096): (2, 1024, 4),
    (4096, 12288): (4, 1024, 2),
    (151748, 4096): (1, 1024, 4),
    # TTS (Llama-300M shaped): q/k/v, o, gate/up, down (SwiGLU), code head
    (2304, 768): (8, 128, 8),
    (768, 768): (2, 1024, 4),
    (6144, 768): (16, 128, 8),
    (768, 3072): (4, 1024, 8),
    (6562, 768): (16, 128, 8),
}
DEFAULT_CONFIG = (2, 1024, 4)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Torch x @ weight.T; the definition the kernel is tested against."""
    return F.linear(x, weight)


def swiglu_gemv_reference(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Torch (silu(gate) * up) @ weight.T, with gate/up the two halves of gate_up's last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    activation = (F.silu(gate.float()) * up.float()).to(gate_up.dtype)
    return F.linear(activation, weight)


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, weight_ptr, out_ptr, n_rows, n_cols, weight_row_stride,
        SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        row_ptrs = weight_ptr + rows.to(tl.int64)[:, None] * weight_row_stride
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
            w = tl.load(row_ptrs + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask)


def gemv_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a weight of n_rows x n_cols."""
    return GEMV_CONFIGS.get((n_rows, n_cols), DEFAULT_CONFIG)


def launch_gemv(x: torch.Tensor, weight: torch.Tensor, swiglu: bool,
                config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Run the kernel on one contiguous row x ([K], or [2K] with `swiglu`); returns [N] in x.dtype."""
    n_rows, n_cols = weight.shape
    block_n, block_k, num_warps = config or gemv_config(n_rows, n_cols)
    out = torch.empty(n_rows, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n_rows, block_n),)](
        x, weight, out, n_rows, n_cols, weight.stride(0),
        SWIGLU=swiglu, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out


def _gemv_triton(x: torch.Tensor, weight: torch.Tensor, swiglu: bool) -> torch.Tensor:
    row = x.reshape(-1)
    if row.stride(0) != 1:
        row = row.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    return launch_gemv(row, weight, swiglu).view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("omni::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Custom op: x [..., K] holding one row, weight [N, K] -> [..., N] (Triton where it runs)."""
    if triton_runs_on(x.device):
        return _gemv_triton(x, weight, swiglu=False)
    return gemv_reference(x, weight).contiguous()


@gemv_op.register_fake
def _gemv_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("omni::swiglu_gemv", mutates_args=())
def swiglu_gemv_op(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Custom op: gate_up [..., 2F] holding one row, weight [N, F] -> (silu(gate) * up) @ weight.T."""
    if triton_runs_on(gate_up.device):
        return _gemv_triton(gate_up, weight, swiglu=True)
    return swiglu_gemv_reference(gate_up, weight).contiguous()


@swiglu_gemv_op.register_fake
def _swiglu_gemv_fake(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty(*gate_up.shape[:-1], weight.shape[0])
