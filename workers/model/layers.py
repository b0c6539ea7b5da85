"""Shared decoder building blocks (gpt-fast style) for the Qwen3 LLM and the Llama-style TTS backbone.

* Parameter names follow the Hugging Face checkpoints (MODEL.md §2.2): `q_proj`, `k_proj`, ...,
  `input_layernorm`, `mlp.gate_proj`, ... Nothing is renamed at load time.
* Each layer's KV cache is an `nn.Module` whose `k_cache`/`v_cache` are non-persistent buffers (static
  addresses, so CUDA graphs can capture the in-place updates); one cache holds several session slots.
* Keys are stored after RoPE, so a cache can drop a span of positions and re-rotate the kept keys
  (`Decoder.evict`) without recomputing them.
* The math of norms and the gated MLP goes through the small module-level functions `rms_norm`,
  `add_rms_norm` and `silu_mul`. Where the Triton kernels run (CUDA, switch on; see `workers.kernels`)
  they call the `omni::*` custom ops, which trace into torch.compile graphs as single calls, so eager
  and compiled code run the same kernels; elsewhere they compute the Hugging Face reference math.
  Decode steps (T = 1) attend through `kernels.decode_attention`, whose split-KV Triton kernel has a
  switch of its own (`compile.decode_attention_kernel`).
* Bias-free products go through `linear`, which hands a single row (a decode step) to the Triton GEMV
  kernel where it runs and its switch is on (`compile.gemv_kernel`); the fused MLP then also folds
  SwiGLU into the down projection. With `compile.decode_fusion` a decode step also folds both RMSNorms
  into the GEMV that follows each and both residual adds into the GEMV before each (`linear`'s `norm`
  and `residual`), and runs the q/k norms, rotations and K/V write as one kernel, so a layer is seven
  kernels: four products, that prologue and the two of split-KV attention.
* `Decoder.fuse_projections()` (optional, after loading) packs q/k/v and gate/up into one matrix each
  while the checkpoint-named parameters stay as views into it, so `state_dict()` keeps its names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from workers import kernels

INIT_STD = 0.02  # MODEL.md §2.4


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, computed in fp32 and scaled in the input dtype (as Hugging Face does).

    The Triton kernel (where it runs) also applies the weight in fp32 before rounding: same result up to
    one rounding of the output.
    """
    if kernels.use_triton(x):
        return kernels.rms_norm(x, weight, eps)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(residual: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Residual add followed by RMSNorm; returns (residual + delta, rms_norm(residual + delta))."""
    if kernels.use_triton(residual):
        normed, summed = kernels.add_rms_norm(delta, residual, weight, eps)
        return summed, normed
    summed = residual + delta
    return summed, rms_norm(summed, weight, eps)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU activation: silu(gate) * up (the Triton kernel computes it in fp32)."""
    if kernels.use_triton(gate):
        return kernels.silu_mul(gate, up)
    return F.silu(gate) * up


def linear(x: Tensor, weight: Tensor, norm: RMSNorm | None = None, residual: Tensor | None = None) -> Tensor:
    """[residual +] (norm(x) if norm is given, else x) @ weight.T (bias-free). A single row (a decode step)
    goes through the Triton GEMV kernel where it runs and its switch is on: one kernel per product, no
    split-K reduction pass, the norm and the residual add inside it."""
    if kernels.use_gemv(x):
        return kernels.gemv(x, weight, None if norm is None else norm.weight, 0.0 if norm is None else norm.eps,
                            residual)
    out = F.linear(x if norm is None else norm(x), weight)
    return out if residual is None else residual + out


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies of rotary embeddings, fp32 [head_dim // 2]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin of the rotary angles for the given (float or integer) positions: fp32 [..., head_dim // 2]."""
    angles = positions.double()[..., None] * rope_inv_freq(head_dim, theta, positions.device).double()
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., T, head_dim] by cos/sin [T, head_dim // 2] (Hugging Face rotate-half layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def round_up_kv_len(length: int, max_len: int, multiple: int = 128) -> int:
    """Round an attention length up to a multiple (fewer shapes for compiled graphs), capped at max_len."""
    return min(max_len, -(-length // multiple) * multiple)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class KVCache(nn.Module):
    """Static K/V storage of one layer: buffers [slots, kv_heads, max_len, head_dim], a slot per session."""

    def __init__(self, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (slots, kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, slot: int, input_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Write k/v [kv_heads, T, head_dim] at positions input_pos [T] of `slot`, in place.

        Compiled, the write indexes the whole buffer with a tensor on each leading axis: written through
        the `k_cache[slot]` view instead, Inductor copies the whole slot out and back on every call
        (measured: four 16 MB copies per LLM layer and step on an H100, ≈ 1.6 ms of an 8 ms step). Eager,
        the view's `index_copy_` is one kernel where the broadcast `index_put_` takes several.
        """
        if not torch.compiler.is_compiling():
            self.k_cache[slot].index_copy_(1, input_pos, k)
            self.v_cache[slot].index_copy_(1, input_pos, v)
            return
        heads = torch.arange(k.shape[0], device=k.device)[:, None]
        index = (input_pos.new_full((1, 1), slot), heads, input_pos[None, :])
        self.k_cache.index_put_(index, k)
        self.v_cache.index_put_(index, v)


class Attention(nn.Module):
    """Grouped-query self-attention over a static KV cache; optional per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 qk_norm: bool) -> None:
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.kv_cache: KVCache | None = None
        self.register_buffer("wqkv", None, persistent=False)  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Pack q/k/v into one [q+k+v, hidden] matrix; q/k/v_proj.weight become views of it."""
        self.wqkv = _fuse_linear_weights([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, slot: int,
                kv_len: int, norm: RMSNorm | None = None, residual: Tensor | None = None) -> Tensor:
        """[residual +] attention(norm(x) if norm is given, else x); in a decode step through the GEMV
        kernel, the norm rides in the q/k/v product and the residual add in the output projection."""
        batch, seq, _ = x.shape
        q_size = self.heads * self.head_dim
        if self._fusable_decode_prologue() and kernels.use_decode_fusion(x):
            q = self._fused_decode_queries(linear(x, self.wqkv, norm=norm), cos, sin, input_pos, slot)
        else:
            q = self._queries(x, norm, cos, sin, input_pos, slot)
        keys = self.kv_cache.k_cache[slot, :, :kv_len].unsqueeze(0)  # [1, kv_heads, kv_len, D]
        values = self.kv_cache.v_cache[slot, :, :kv_len].unsqueeze(0)
        # GQA without repeating K/V: the query heads sharing one KV head become extra query rows.
        groups = self.heads // self.kv_heads
        q = q.reshape(batch, self.kv_heads, groups * seq, self.head_dim)
        if seq == 1:
            out = kernels.decode_attention(q, keys, values, input_pos)
        else:
            visible = kernels.visible_keys(input_pos, kv_len)  # [T, kv_len]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible.repeat(groups, 1))
        out = out.reshape(batch, self.heads, seq, self.head_dim).transpose(1, 2).reshape(batch, seq, q_size)
        return linear(out, self.o_proj.weight, residual=residual)

    def _queries(self, x: Tensor, norm: RMSNorm | None, cos: Tensor, sin: Tensor, input_pos: Tensor,
                 slot: int) -> Tensor:
        """Project x [1, T, H], norm and rotate q and k, write K/V at input_pos: the queries [1, heads, T, D]."""
        batch, seq, _ = x.shape
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.wqkv is not None:
            q, k, v = linear(x, self.wqkv, norm=norm).split([q_size, kv_size, kv_size], dim=-1)
        else:
            x = x if norm is None else norm(x)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, seq, self.heads, self.head_dim)
        k = k.view(batch, seq, self.kv_heads, self.head_dim)
        v = v.view(batch, seq, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [1, heads, T, D]
        k = apply_rope(k.transpose(1, 2), cos, sin)
        self.kv_cache.update(slot, input_pos, k[0], v.transpose(1, 2)[0])
        return q

    def _fusable_decode_prologue(self) -> bool:
        """Whether `_fused_decode_queries` applies: fused projections, a power-of-2 head size (a Triton
        block) and one eps for both q/k norms (the kernel takes one)."""
        same_eps = self.q_norm is None or self.q_norm.eps == self.k_norm.eps
        return self.wqkv is not None and self.head_dim & (self.head_dim - 1) == 0 and same_eps

    def _fused_decode_queries(self, qkv: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor,
                              slot: int) -> Tensor:
        """`_queries` of a decode step from its q/k/v row, as one kernel (norms, rotations, K/V write)."""
        norms = (None, None) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
        eps = 0.0 if self.q_norm is None else self.q_norm.eps
        q = kernels.qk_norm_rope_cache(qkv, *norms, eps, cos, sin, self.kv_cache.k_cache, self.kv_cache.v_cache,
                                       slot, input_pos, self.heads)
        return q.view(1, self.heads, 1, self.head_dim)


class MLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.register_buffer("w13", None, persistent=False)  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Pack gate/up into one [2*ffn, hidden] matrix; gate/up_proj.weight become views of it."""
        self.w13 = _fuse_linear_weights([self.gate_proj, self.up_proj])

    def forward(self, x: Tensor, norm: RMSNorm | None = None, residual: Tensor | None = None) -> Tensor:
        """[residual +] mlp(norm(x) if norm is given, else x); in a decode step through the GEMV kernel,
        the norm rides in the gate/up product and the residual add in the down projection."""
        if self.w13 is not None:
            gate_up = linear(x, self.w13, norm=norm)
            if kernels.use_gemv(gate_up):  # a decode step: SwiGLU fused into the down projection
                return kernels.swiglu_gemv(gate_up, self.down_proj.weight, residual)
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            x = x if norm is None else norm(x)
            gate, up = self.gate_proj(x), self.up_proj(x)
        return linear(silu_mul(gate, up), self.down_proj.weight, residual=residual)


def _fuse_linear_weights(linears: list[nn.Linear]) -> Tensor:
    """Concatenate bias-free Linear weights along the output dim and re-point each weight at its slice.

    The fused tensor (registered as a non-persistent buffer) is the only storage afterwards; in-place
    `load_state_dict` still works, but moving the module to another device/dtype would split the storages
    again (doubling memory), so fuse last.
    """
    with torch.no_grad():
        fused = torch.cat([linear.weight for linear in linears], dim=0)
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(fused[start:start + rows], requires_grad=linear.weight.requires_grad)
        start += rows
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, eps: float,
                 qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = Attention(hidden, heads, kv_heads, head_dim, eps, qk_norm)
        self.mlp = MLP(hidden, ffn)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, slot: int,
                kv_len: int) -> Tensor:
        if kernels.use_decode_fusion(x):
            # A decode step: each norm rides in the product after it, each residual add in the one before.
            x = self.self_attn(x, cos, sin, input_pos, slot, kv_len, norm=self.input_layernorm, residual=x)
            return self.mlp(x, norm=self.post_attention_layernorm, residual=x)
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, input_pos, slot, kv_len)
        x, normed = add_rms_norm(x, attn_out, self.post_attention_layernorm.weight,
                                 self.post_attention_layernorm.eps)
        return x + self.mlp(normed)


class Decoder(nn.Module):
    """Pre-norm decoder stack (`embed_tokens`, `layers`, `norm`) with a multi-slot static KV cache."""

    def __init__(self, *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                 ffn: int, eps: float, rope_theta: float, max_positions: int, qk_norm: bool) -> None:
        super().__init__()
        self.head_dim, self.kv_heads, self.rope_theta = head_dim, kv_heads, rope_theta
        self.max_positions = max_positions
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden, heads, kv_heads, head_dim, ffn, eps, qk_norm) for _ in range(layers)
        )
        self.norm = RMSNorm(hidden, eps)
        self.register_buffer("rope_cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.init_rope_tables()

    def init_rope_tables(self) -> None:
        """(Re)compute the rotary tables; needed after `to_empty()` since they are not in the state dict."""
        positions = torch.arange(self.max_positions, device=self.rope_cos.device)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def init_weights(self) -> None:
        """Random init (MODEL.md §2.4) of the stack, plus the rotary tables."""
        init_module_weights(self)
        self.init_rope_tables()

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up matmuls in every layer; call once the weights are loaded and placed."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def kv_cache_bytes(self, slots: int, max_len: int, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V caches for all layers at the given size (default dtype: the weights')."""
        element = torch.empty((), dtype=dtype or self.norm.weight.dtype).element_size()
        return 2 * len(self.layers) * slots * self.kv_heads * max_len * self.head_dim * element

    def setup_caches(self, slots: int, max_len: int) -> None:
        """Allocate (or re-allocate, dropping the old buffers first) the KV caches on the weights' device."""
        if max_len > self.max_positions:
            raise ValueError(f"max_len {max_len} exceeds max_positions {self.max_positions}")
        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        for layer in self.layers:
            layer.self_attn.kv_cache = None  # free before allocating, so peak memory is one cache set
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(slots, self.kv_heads, max_len, self.head_dim, device, dtype)

    @property
    def cache_max_len(self) -> int:
        """Positions per slot in the allocated KV cache (0 when none is allocated)."""
        cache = self.layers[0].self_attn.kv_cache
        return 0 if cache is None else cache.k_cache.shape[2]

    def forward(self, x: Tensor, input_pos: Tensor, slot: int, kv_len: int) -> Tensor:
        """Run embeddings x [1, T, H] at positions input_pos [T]; return the final post-norm hidden [1, T, H].

        K/V of the new positions are written into `slot`; attention covers cache positions [0, kv_len) with
        a causal mask, so kv_len may be any bucket >= max(input_pos) + 1.
        """
        cos = self.rope_cos[input_pos].to(x.dtype)
        sin = self.rope_sin[input_pos].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, slot, kv_len)
        return self.norm(x)

    @torch.no_grad()
    def evict(self, slot: int, start: int, end: int, length: int) -> None:
        """Drop cache positions [start, end) of `slot`, shifting [end, length) left by end - start.

        The shifted keys are re-rotated by -(end - start) so RoPE positions stay contiguous; this is exact
        because keys are stored post-RoPE and q/k norms come before RoPE.
        """
        if not 0 <= start <= end <= length <= self.cache_max_len:
            raise ValueError(f"bad eviction range start={start} end={end} length={length}")
        shift, kept = end - start, length - end
        if shift == 0 or kept == 0:
            return
        cos, sin = rope_cos_sin(torch.tensor([float(shift)], device=self.norm.weight.device),
                                self.head_dim, self.rope_theta)
        for layer in self.layers:
            cache = layer.self_attn.kv_cache
            keys = cache.k_cache[slot, :, end:length].float()
            cache.k_cache[slot, :, start:start + kept] = apply_rope(keys, cos, -sin).to(cache.k_cache.dtype)
            cache.v_cache[slot, :, start:start + kept] = cache.v_cache[slot, :, end:length].clone()


@torch.no_grad()
def init_module_weights(module: nn.Module) -> None:
    """MODEL.md §2.4: normal(0, 0.02) for Linear/Embedding/Conv weights, zero biases, ones for norms.

    A weight-normed Linear gets its direction initialised and its magnitude set to the row norms, so its
    effective weight equals the sampled matrix.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)):
            if parametrize.is_parametrized(sub, "weight"):
                weight_params = sub.parametrizations.weight
                magnitude, direction = weight_params.original0, weight_params.original1
                direction.normal_(0.0, INIT_STD)
                magnitude.copy_(direction.norm(dim=tuple(range(1, direction.dim())), keepdim=True))
            else:
                sub.weight.normal_(0.0, INIT_STD)
            if getattr(sub, "bias", None) is not None:
                sub.bias.zero_()
        elif isinstance(sub, (RMSNorm, nn.LayerNorm)):
            if sub.weight is not None:
                sub.weight.fill_(1.0)
            if getattr(sub, "bias", None) is not None:
                sub.bias.zero_()
