"""Decode attention: one query position, grouped-query attention over a static KV cache.

Shapes: q [1, kv_heads, groups, D] (the `groups` query heads sharing one KV head, stacked as rows),
keys/values [1, kv_heads, kv_len, D] (views of a cache slot: any strides), the query position
`input_pos` ([1] or 0-dim, int64). Key j is visible iff j <= input_pos; scale D**-0.5; softmax in
float32; output [1, kv_heads, groups, D] in q.dtype.

The Triton version is split-KV ("flash-decoding"): a decode step has only kv_heads x groups query
rows, too few to fill a GPU by rows, so the keys are cut into splits and the grid is (kv_heads,
splits). Each program loads the query rows of its KV head once, runs an online softmax over its keys
(skipping those past the query position without reading them) and writes a partial (max, sum,
weighted values) to float32 scratch; a second kernel, one program per query row, merges the splits.
The split count depends only on kv_len and kv_heads (shapes), so one CUDA graph per kv_len bucket
serves every position in it.
"""

from __future__ import annotations

import torch

from workers.kernels._dispatch import KERNELS_INTERPRETED, tl, triton, triton_runs_on

# Keys per inner-loop tile; also the smallest split.
_BLOCK_N = 64
# Programs the split kernel aims for: about two per SM of an H100 (132 SMs), so none sits idle.
_TARGET_PROGRAMS = 256
# Upper bound on splits, so the merge kernel holds all partials of one row in one tile.
_MAX_SPLITS = 64
# tl.dot needs every dimension >= 16: the query rows of one KV head (and tiny head dims) are padded up.
_MIN_DOT_DIM = 16


def visible_keys(input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Causal visibility [T, kv_len] of the first kv_len cache positions for queries at input_pos [T]."""
    return torch.arange(kv_len, device=input_pos.device)[None, :] <= input_pos[:, None]


def decode_attention_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, input_pos: torch.Tensor
) -> torch.Tensor:
    """Attention of one position, written out: q [1, kv_heads, groups, D] over keys/values
    [1, kv_heads, kv_len, D], keys past input_pos ([1] or 0-dim) masked; softmax in fp32.

    Fused SDPA kernels spread their work over (heads x query blocks), only kv_heads blocks for a decode
    step, so their time grows with kv_len on a nearly idle GPU; two batched matmuls and a softmax spread
    over kv_len instead.
    """
    visible = visible_keys(input_pos.reshape(1), keys.shape[2])  # [1, kv_len]
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.matmul(weights.to(values.dtype), values)


def split_len(kv_len: int, kv_heads: int) -> int:
    """Keys per split: a power of 2 >= _BLOCK_N giving about _TARGET_PROGRAMS programs and <= _MAX_SPLITS
    splits."""
    per_program = -(-kv_len * kv_heads // _TARGET_PROGRAMS)
    per_split_cap = -(-kv_len // _MAX_SPLITS)
    return max(_BLOCK_N, 1 << (max(per_program, per_split_cap) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _decode_attention_split_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, max_ptr, sum_ptr, acc_ptr,
        q_head_stride, q_row_stride, q_dim_stride,
        k_head_stride, k_key_stride, k_dim_stride,
        v_head_stride, v_key_stride, v_dim_stride,
        kv_len, groups, head_dim, split_len, scale,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        head = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        rows = tl.arange(0, ROWS)
        dims = tl.arange(0, BLOCK_D)
        row_mask = rows < groups
        dim_mask = dims < head_dim
        q = tl.load(
            q_ptr + head * q_head_stride + rows[:, None] * q_row_stride + dims[None, :] * q_dim_stride,
            mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
        )
        if DOT_IN_FP32:
            q = q.to(tl.float32)
        # Keys this split reads: its range, cut at the last visible one (j <= position).
        visible_end = tl.minimum(kv_len, tl.load(pos_ptr).to(tl.int32) + 1)
        start = split * split_len
        end = tl.minimum(start + split_len, visible_end)
        running_max = tl.full([ROWS], float("-inf"), tl.float32)
        running_sum = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
        for block_start in range(start, end, BLOCK_N):
            keys_idx = block_start + tl.arange(0, BLOCK_N)
            key_mask = keys_idx < end
            tile_mask = key_mask[:, None] & dim_mask[None, :]
            k_offsets = head * k_head_stride + keys_idx[:, None] * k_key_stride + dims[None, :] * k_dim_stride
            k = tl.load(k_ptr + k_offsets, mask=tile_mask, other=0.0)
            if DOT_IN_FP32:
                k = k.to(tl.float32)
            # "ieee": exact products for fp32 inputs (tf32 would miss 1e-5); 16-bit inputs use MMA anyway.
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            scores = tl.where(key_mask[None, :], scores * scale, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            rescale = tl.exp(running_max - new_max)
            weights = tl.exp(scores - new_max[:, None])
            running_sum = running_sum * rescale + tl.sum(weights, axis=1)
            v_offsets = head * v_head_stride + keys_idx[:, None] * v_key_stride + dims[None, :] * v_dim_stride
            v = tl.load(v_ptr + v_offsets, mask=tile_mask, other=0.0)
            if DOT_IN_FP32:
                v = v.to(tl.float32)
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision="ieee")
            running_max = new_max
        # Partials of (head, split), laid out [kv_heads, splits, ROWS(, BLOCK_D)]; a split that read no
        # key leaves (-inf, 0, 0), which the merge weighs by zero.
        partial = (head * splits + split) * ROWS + rows
        tl.store(max_ptr + partial, running_max)
        tl.store(sum_ptr + partial, running_sum)
        tl.store(acc_ptr + partial[:, None] * BLOCK_D + dims[None, :], acc)

    @triton.jit
    def _decode_attention_merge_kernel(
        max_ptr, sum_ptr, acc_ptr, out_ptr, out_head_stride, out_row_stride, groups, head_dim, splits,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        head = tl.program_id(0).to(tl.int64)
        row = tl.program_id(1)
        split_idx = tl.arange(0, BLOCK_S)
        dims = tl.arange(0, BLOCK_D)
        split_mask = split_idx < splits
        partial = (head * splits + split_idx) * ROWS + row
        split_max = tl.load(max_ptr + partial, mask=split_mask, other=float("-inf"))
        split_sum = tl.load(sum_ptr + partial, mask=split_mask, other=0.0)
        split_acc = tl.load(
            acc_ptr + partial[:, None] * BLOCK_D + dims[None, :], mask=split_mask[:, None], other=0.0
        )
        # Split 0 always holds key 0 (visible at every position), so the max is finite.
        weights = tl.exp(split_max - tl.max(split_max, axis=0))
        total = tl.sum(weights * split_sum, axis=0)
        out = tl.sum(weights[:, None] * split_acc, axis=0) / total
        tl.store(
            out_ptr + head * out_head_stride + row * out_row_stride + dims,
            out.to(out_ptr.dtype.element_ty), mask=dims < head_dim,
        )


def _decode_attention_triton(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, input_pos: torch.Tensor
) -> torch.Tensor:
    _, kv_heads, groups, head_dim = q.shape
    kv_len = keys.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or kv_len == 0:
        return out.zero_()
    keys_per_split = split_len(kv_len, kv_heads)
    splits = triton.cdiv(kv_len, keys_per_split)
    rows = max(_MIN_DOT_DIM, triton.next_power_of_2(groups))
    block_d = max(_MIN_DOT_DIM, triton.next_power_of_2(head_dim))
    split_max = torch.empty(kv_heads, splits, rows, dtype=torch.float32, device=q.device)
    split_sum = torch.empty_like(split_max)
    split_acc = torch.empty(kv_heads, splits, rows, block_d, dtype=torch.float32, device=q.device)
    _decode_attention_split_kernel[(kv_heads, splits)](
        q, keys, values, input_pos, split_max, split_sum, split_acc,
        q.stride(1), q.stride(2), q.stride(3),
        keys.stride(1), keys.stride(2), keys.stride(3),
        values.stride(1), values.stride(2), values.stride(3),
        kv_len, groups, head_dim, keys_per_split, head_dim**-0.5,
        ROWS=rows, BLOCK_D=block_d, BLOCK_N=_BLOCK_N,
        # The Triton interpreter's tl.dot multiplies bfloat16 bit patterns as integers: upcast there.
        DOT_IN_FP32=KERNELS_INTERPRETED and q.dtype == torch.bfloat16, num_warps=4,
    )
    _decode_attention_merge_kernel[(kv_heads, groups)](
        split_max, split_sum, split_acc, out, out.stride(1), out.stride(2), groups, head_dim, splits,
        ROWS=rows, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits), num_warps=4,
    )
    return out


@torch.library.custom_op("omni::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, input_pos: torch.Tensor
) -> torch.Tensor:
    """Custom op: the Triton kernels where they can run, else the reference (a fresh contiguous tensor)."""
    if triton_runs_on(q.device):
        return _decode_attention_triton(q, keys, values, input_pos)
    return decode_attention_reference(q, keys, values, input_pos).contiguous()


@decode_attention_op.register_fake
def _decode_attention_fake(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, input_pos: torch.Tensor
) -> torch.Tensor:
    return q.new_empty(q.shape)
