"""When the Triton kernels run, and how they are launched.

Triton is optional: without it `triton` and `tl` are None, the kernel modules skip their
`@triton.jit` definitions, and every call falls back to the torch reference.

Switches decide whether the public functions use Triton (`KernelSwitch`: set from config, overridden
by an environment variable read at import):
- `TRITON_KERNELS` (config `compile.triton_kernels`, env `OMNI_TRITON_KERNELS=0|1`): all kernels;
- `DECODE_ATTENTION` (config `compile.decode_attention_kernel`, env `OMNI_TRITON_DECODE_ATTENTION`):
  the split-KV decode-attention kernel, which also needs `TRITON_KERNELS`;
- `GEMV` (config `compile.gemv_kernel`, env `OMNI_TRITON_GEMV`): the single-row matrix-vector kernel
  of decode steps, which also needs `TRITON_KERNELS`;
- `DECODE_FUSION` (config `compile.decode_fusion`, env `OMNI_TRITON_DECODE_FUSION`): decode steps fold their
  RMSNorms and residual adds into the GEMV kernels' prologue / epilogue and run the q/k norms, rotations
  and K/V write as one kernel (needs `GEMV`);
and the tensor's device: CUDA, or CPU when the kernels were defined under the Triton interpreter
(`TRITON_INTERPRET=1` before the first import of this package) and `set_interpret(True)` was called.
"""

from __future__ import annotations

import os
from typing import Any

import torch

triton: Any
tl: Any
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: references only
    triton = None
    tl = None

# The interpreter is chosen when `@triton.jit` runs, i.e. when the kernel modules are imported.
KERNELS_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


class KernelSwitch:
    """An on/off switch: `set()` from config; the environment variable `env`, read once at import (so
    compiled graphs guard on plain attributes, never on the environment), wins when it is set."""

    def __init__(self, env: str, default: bool) -> None:
        self.env = env
        value = os.environ.get(env, "").strip().lower()
        self._override = None if value == "" else value not in ("0", "false", "no", "off")
        self._on = default

    def set(self, on: bool) -> None:
        self._on = bool(on)

    def is_on(self) -> bool:
        """The switch as it applies now: the environment override if set, else the last `set()`."""
        return self._on if self._override is None else self._override


TRITON_KERNELS = KernelSwitch("OMNI_TRITON_KERNELS", True)
# Off outside the runners, which set them from the config around every call (and the heads' capture):
# products and attention of the eager and compile-default modes keep the reference's torch math.
DECODE_ATTENTION = KernelSwitch("OMNI_TRITON_DECODE_ATTENTION", False)
GEMV = KernelSwitch("OMNI_TRITON_GEMV", False)
DECODE_FUSION = KernelSwitch("OMNI_TRITON_DECODE_FUSION", False)
_interpret = False


def set_interpret(interpret: bool) -> None:
    """Allow CPU tensors to run the kernels through the Triton interpreter (tests only)."""
    global _interpret
    _interpret = bool(interpret)


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can execute on tensors of `device`, ignoring the on/off switch."""
    if triton is None:
        return False
    if device.type == "cuda":
        return not KERNELS_INTERPRETED
    return device.type == "cpu" and KERNELS_INTERPRETED and _interpret


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a public kernel function should call its Triton custom op for `tensor`."""
    return TRITON_KERNELS.is_on() and triton_runs_on(tensor.device)


def row_block_and_warps(n_cols: int) -> tuple[int, int]:
    """Block (next power of 2 of the row length) and warp count for a one-program-per-row kernel."""
    block = 1 << max(n_cols - 1, 0).bit_length()
    if block > 65536:
        raise ValueError(f"rows of {n_cols} elements exceed the single-block limit of 65536")
    if block >= 32768:
        return block, 32
    if block >= 8192:
        return block, 16
    if block >= 2048:
        return block, 8
    return block, 4


def launch_per_row(kernel: Any, n_rows: int, n_cols: int, *args: Any) -> None:
    """Launch a one-program-per-row `kernel` (whole row in one block of `BLOCK`) over `n_rows` rows.

    Nothing is launched for zero rows.
    """
    if n_rows == 0:
        return
    block, num_warps = row_block_and_warps(n_cols)
    kernel[(n_rows,)](*args, BLOCK=block, num_warps=num_warps)


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """View `tensor` as [rows, last_dim] with a unit stride on the last dim (copying only if needed)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
