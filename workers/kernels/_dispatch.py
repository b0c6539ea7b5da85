"""When the Triton kernels run, and how they are launched.

Triton is optional: without it `triton` and `tl` are None, the kernel modules skip their
`@triton.jit` definitions, and every call falls back to the torch reference.

Two switches decide whether the public functions use Triton:
- `set_enabled()` (driven by config `compile.triton_kernels`), overridden by the environment
  variable `OMNI_TRITON_KERNELS=0|1` when set;
- the tensor's device: CUDA, or CPU when the kernels were defined under the Triton interpreter
  (`TRITON_INTERPRET=1` before the first import of this package) and `set_interpret(True)` was called.

The decode-attention kernel (experimental, off by default) also needs its own switch:
`set_decode_attention_enabled()` (config `compile.decode_attention_kernel`), overridden by
`OMNI_TRITON_DECODE_ATTENTION=0|1` when set.
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

ENABLE_ENV = "OMNI_TRITON_KERNELS"
DECODE_ATTENTION_ENV = "OMNI_TRITON_DECODE_ATTENTION"
# The interpreter is chosen when `@triton.jit` runs, i.e. when the kernel modules are imported.
KERNELS_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def _read_env_override(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    return value not in ("0", "false", "no", "off")


# Read once, so that compiled graphs only guard on module globals (no environment reads while tracing).
_ENV_OVERRIDE = _read_env_override(ENABLE_ENV)
_DECODE_ATTENTION_ENV_OVERRIDE = _read_env_override(DECODE_ATTENTION_ENV)
_enabled = True
_decode_attention_enabled = False
_interpret = False


def set_enabled(enabled: bool) -> None:
    """Turn the Triton kernels on or off for this process (config `compile.triton_kernels`)."""
    global _enabled
    _enabled = bool(enabled)


def is_enabled() -> bool:
    """The switch as it applies now: `OMNI_TRITON_KERNELS` (read at import) wins over `set_enabled()`."""
    if _ENV_OVERRIDE is not None:
        return _ENV_OVERRIDE
    return _enabled


def set_decode_attention_enabled(enabled: bool) -> None:
    """Turn the decode-attention kernel on or off (config `compile.decode_attention_kernel`)."""
    global _decode_attention_enabled
    _decode_attention_enabled = bool(enabled)


def is_decode_attention_enabled() -> bool:
    """The decode-attention switch as it applies now: `OMNI_TRITON_DECODE_ATTENTION` wins over the setter.

    The kernel runs only where `use_triton()` holds as well.
    """
    if _DECODE_ATTENTION_ENV_OVERRIDE is not None:
        return _DECODE_ATTENTION_ENV_OVERRIDE
    return _decode_attention_enabled


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
    return is_enabled() and triton_runs_on(tensor.device)


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
