"""How a decoder backbone (LLM `llm.model`, TTS `tts.model`) is executed: eager, compiled, or fast.

`DecoderRunner(decoder, mode)` wraps one `Decoder` (workers/model/layers.py) and exposes
`forward(x [1, T, H], start_pos, slot) -> hidden [1, T, H]` for prefill and decode alike; the session
keeps sampling and the position bookkeeping.

Modes (config `model.acceleration`, `python -m bench.duplex --mode`):

* `eager`: a direct call, attention over `round_up_kv_len(start + T)` cache positions.
* `compile-default`: the reference system's setting, kept as the yardstick:
  `torch.compile(decoder, mode="default", dynamic=True)`, called like eager.
* `fast`:
  - prefill lengths padded up to a few buckets (16 ... 512 tokens); padding rows come after the real
    ones, so the causal mask keeps the real rows exact, and their K/V land beyond the live length,
    where the next real tokens overwrite them before anything reads them;
  - attention over a bucketed live length (multiples of `kv_bucket`), not over the whole cache;
  - regional compilation: each `DecoderLayer` is compiled once (`fullgraph=True`, dynamic shapes) and
    the compiled code is shared by all layers of the stack, so a cold compile costs two layer graphs
    (T = 1 and T > 1) per decoder instead of one whole-stack graph per shape;
  - one CUDA graph per (slot, prefill bucket, kv bucket), captured by `warmup()` around the whole step
    (input staging excluded), replayed afterwards. The graphs read static buffers (inputs, the start
    position as a device tensor updated in place) and the KV caches, which are module buffers, i.e.
    static addresses. Graphs share one memory pool; their results are copied into per-bucket output
    buffers inside the graph, so nothing they allocate outlives a replay;
  - the Triton kernels and fused q/k/v and gate/up projections.

  Inductor's own CUDA graphs (`mode="reduce-overhead"`) are not used: with them every (T, kv_len,
  slot) triple is a separate static-shape compile of the whole stack, and they skip graphs on
  mutated inputs unless every KV buffer is recognised as static. Capturing by hand keeps the compile
  count at two layer graphs and makes any shape the warm-up missed visible: it is captured on
  first use and counted by `recompiles_since_warmup()`, which must stay 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Literal

import torch
import torch._dynamo
from torch import Tensor

from common.config import CompileConfig
from workers import kernels
from workers.model.layers import Decoder, DecoderLayer, round_up_kv_len

Mode = Literal["eager", "compile-default", "fast"]
MODES: tuple[Mode, ...] = ("eager", "compile-default", "fast")

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)
KV_BUCKET = 512
EAGER_KV_MULTIPLE = 128  # the session's own rounding in eager and compile-default modes
# One dynamo cache entry per (decoder shape, T == 1 or not, slot 0 / 1 / other) and mode; the default
# limit of 8 entries per code object would silently fall back to eager for the second decoder.
RECOMPILE_LIMIT = 64


def dynamo_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (all compiled functions together)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _call_layer(layer: DecoderLayer, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, slot: int,
                kv_len: int) -> Tensor:
    """One decoder layer; the function `fast` mode compiles (shared by every layer of every stack)."""
    return layer(x, cos, sin, input_pos, slot, kv_len)


@contextmanager
def _kernel_switches(settings: dict[kernels.KernelSwitch, bool]) -> Iterator[None]:
    """Set kernel switches for the duration of a call, then put back what they were."""
    previous = {switch: switch.is_on() for switch in settings}
    for switch, on in settings.items():
        switch.set(on)
    try:
        yield
    finally:
        for switch, on in previous.items():
            switch.set(on)


class DecoderRunner:
    """Run one decoder backbone in an acceleration mode; see the module docstring.

    Args:
        decoder: the backbone, caches already set up (`setup_caches`), weights loaded and placed.
        mode: `eager`, `compile-default` or `fast`.
        max_len: positions a slot may use (default: the cache's length).
        prefill_buckets: padded prefill lengths of `fast` mode; longer prefills run in chunks.
        kv_bucket: granularity of the attended length in `fast` mode.
        cuda_graphs: capture graphs in `fast` mode (default: when the decoder is on CUDA).
        triton_kernels: the Triton kernel switch, set around each call (default: on in `fast`, off in
            the other modes, which keep the reference's torch math).
        decode_attention_kernel: the switch of the split-KV decode-attention kernel, set around each
            call like `triton_kernels` (which it needs as well); default: the config's default.
        gemv_kernel: the switch of the single-row matrix-vector kernel (decode steps), set likewise.
        decode_fusion: the switch that folds a decode step's norms and residual adds into its GEMV kernels and
            its q/k norms, rotations and K/V write into one kernel, set likewise.
        layer_probe: `fast` mode only: called as probe(layer_index, output [1, T, H]) after every layer,
            outside the compiled code and inside the captured graphs, so it must only do capturable work
            (e.g. copy into fixed buffers). For layer-by-layer checks; set before `warmup()`.
    """

    def __init__(self, decoder: Decoder, mode: Mode, max_len: int | None = None, *,
                 prefill_buckets: Sequence[int] = PREFILL_BUCKETS, kv_bucket: int = KV_BUCKET,
                 cuda_graphs: bool | None = None, triton_kernels: bool | None = None,
                 decode_attention_kernel: bool | None = None, gemv_kernel: bool | None = None,
                 decode_fusion: bool | None = None, layer_probe: Callable[[int, Tensor], None] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        cache_len = decoder.cache_max_len
        if cache_len == 0:
            raise ValueError("set up the decoder's KV caches before building a runner")
        self.decoder, self.mode = decoder, mode
        self.max_len = cache_len if max_len is None else max_len
        if not 0 < self.max_len <= cache_len:
            raise ValueError(f"max_len {self.max_len} must be in 1..{cache_len} (the cache length)")
        self.device = decoder.norm.weight.device
        self.prefill_buckets = tuple(sorted(b for b in set(prefill_buckets) if 1 < b <= self.max_len))
        self.kv_bucket = kv_bucket
        self.kv_buckets = tuple(sorted({round_up_kv_len(n, self.max_len, kv_bucket)
                                        for n in range(1, self.max_len + 1, kv_bucket)}))
        self.triton_kernels = (mode == "fast") if triton_kernels is None else triton_kernels
        defaults = CompileConfig()
        self._kernel_settings = {
            kernels.TRITON_KERNELS: self.triton_kernels,
            kernels.DECODE_ATTENTION: (defaults.decode_attention_kernel if decode_attention_kernel is None
                                       else decode_attention_kernel),
            kernels.GEMV: defaults.gemv_kernel if gemv_kernel is None else gemv_kernel,
            kernels.DECODE_FUSION: defaults.decode_fusion if decode_fusion is None else decode_fusion,
        }
        if cuda_graphs is None:
            cuda_graphs = mode == "fast" and self.device.type == "cuda"
        self.cuda_graphs = cuda_graphs
        self.layer_probe = layer_probe
        if self.cuda_graphs and (mode != "fast" or self.device.type != "cuda"):
            raise ValueError("CUDA graphs need mode 'fast' and a decoder on CUDA")
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)

        self._compiled: Callable[..., Tensor] | None = None
        self._compiled_layer: Callable[..., Tensor] | None = None
        if mode == "compile-default":
            self._compiled = torch.compile(decoder, mode="default", dynamic=True)
        elif mode == "fast":
            decoder.fuse_projections()
            self._compiled_layer = torch.compile(_call_layer, fullgraph=True, dynamic=True)
        # Static staging buffers of `fast` mode, one per padded length (1 = decode).
        hidden, dtype = decoder.norm.weight.shape[0], decoder.norm.weight.dtype
        lengths = (1, *self.prefill_buckets) if mode == "fast" else ()
        self._inputs = {n: torch.zeros(1, n, hidden, device=self.device, dtype=dtype) for n in lengths}
        self._outputs = {n: torch.zeros(1, n, hidden, device=self.device, dtype=dtype) for n in lengths}
        self._offsets = {n: torch.arange(n, device=self.device) for n in lengths}
        self._start = torch.zeros(1, dtype=torch.long, device=self.device)
        self._graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._warm = False
        self._late_compiles = 0
        self._late_captures = 0

    # ------------------------------------------------------------------------------------------ calls
    @torch.no_grad()
    def forward(self, x: Tensor, start_pos: int, slot: int) -> Tensor:
        """Feed x [1, T, H] at positions [start_pos, start_pos + T) of `slot`; post-norm hidden [1, T, H].

        The result is a fresh tensor (never a view of a reused buffer).
        """
        count = x.shape[1]
        if start_pos < 0 or start_pos + count > self.max_len:
            raise ValueError(f"positions {start_pos}..{start_pos + count} exceed the slot length "
                             f"{self.max_len}")
        x = x.to(self._inputs[1].dtype) if self.mode == "fast" else x
        graphs_before = dynamo_graph_count()
        with _kernel_switches(self._kernel_settings):
            if self.mode == "fast":
                hidden = self._fast_forward(x, start_pos, slot)
            else:
                input_pos = torch.arange(start_pos, start_pos + count, device=x.device)
                kv_len = round_up_kv_len(start_pos + count, self.max_len, EAGER_KV_MULTIPLE)
                call = self._compiled if self._compiled is not None else self.decoder
                hidden = call(x, input_pos, slot, kv_len)
        if self._warm:
            self._late_compiles += dynamo_graph_count() - graphs_before
        return hidden

    __call__ = forward

    def kernel_switches(self) -> AbstractContextManager[None]:
        """This runner's kernel switch settings, for calls of the same model outside it (the step heads)."""
        return _kernel_switches(self._kernel_settings)

    def recompiles_since_warmup(self) -> int:
        """Dynamo compiles plus CUDA-graph captures caused by this runner's calls after `warmup()`."""
        return self._late_compiles + self._late_captures

    @property
    def graph_count(self) -> int:
        """CUDA graphs captured so far."""
        return len(self._graphs)

    # ------------------------------------------------------------------------------------------ warm-up
    @torch.no_grad()
    def warmup(self, slots: Sequence[int] = (0,)) -> None:
        """Compile (and in `fast` mode capture) every shape a session can need, for each slot.

        Writes scratch K/V into the slots: run it before sessions use them.
        """
        with _kernel_switches(self._kernel_settings):
            for slot in slots:
                if self.mode == "fast":
                    for length, kv_len in self.fast_shapes():
                        self._prepare_shape(slot, length, kv_len)
                elif self.mode == "compile-default":
                    self._warm_compiled(slot)
        self._warm = True

    def _warm_compiled(self, slot: int) -> None:
        """compile-default: the reference warms up by running; here a decode step and a short prefill
        compile its two graphs (T = 1 and a dynamic T). Other specialisations (e.g. kv_len equal to the
        cache length) compile when met, as in the reference, and are counted. Inputs are fresh tensors,
        as the session's are: views would add guards."""
        hidden, dtype = self.decoder.norm.weight.shape[0], self.decoder.norm.weight.dtype
        for length in (1, 16):
            self.forward(torch.zeros(1, length, hidden, device=self.device, dtype=dtype), 0, slot)

    def fast_shapes(self) -> list[tuple[int, int]]:
        """(padded length, kv_len) pairs of `fast` mode: decode at every kv bucket, and each prefill
        bucket at every kv bucket it can reach."""
        shapes = [(1, kv_len) for kv_len in self.kv_buckets]
        for length in self.prefill_buckets:
            smallest = round_up_kv_len(length, self.max_len, self.kv_bucket)
            shapes += [(length, kv_len) for kv_len in self.kv_buckets if kv_len >= smallest]
        return shapes

    # ---------------------------------------------------------------------------------------- fast path
    def _fast_forward(self, x: Tensor, start_pos: int, slot: int) -> Tensor:
        """Split into bucket-sized chunks; tokens too near the slot's end for padding go one by one."""
        count = x.shape[1]
        lengths = (1, *self.prefill_buckets)
        pieces, offset = [], 0
        while offset < count:
            chunk = min(count - offset, lengths[-1])
            length = next(b for b in lengths if b >= chunk)
            if start_pos + offset + length > self.max_len:
                length = chunk = 1
            pieces.append(self._run_padded(x[:, offset:offset + chunk], start_pos + offset, slot, length))
            offset += chunk
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _run_padded(self, x: Tensor, start_pos: int, slot: int, length: int) -> Tensor:
        """Stage x [1, n, H] into the length-`length` buffer (zero padding after it) and run the step."""
        count = x.shape[1]
        kv_len = round_up_kv_len(start_pos + length, self.max_len, self.kv_bucket)
        staged = self._inputs[length]
        staged[:, :count].copy_(x)
        if count < length:
            staged[:, count:].zero_()
        self._start.fill_(start_pos)
        if not self.cuda_graphs:
            return self._step(slot, length, kv_len)[:, :count].clone()
        graph = self._graphs.get((slot, length, kv_len))
        if graph is None:  # a shape the warm-up did not cover: capture now, and count it
            self._late_captures += int(self._warm)
            graph = self._capture(slot, length, kv_len)
        graph.replay()
        return self._outputs[length][:, :count].clone()

    def _step(self, slot: int, length: int, kv_len: int) -> Tensor:
        """The captured computation: decoder forward over the staged buffer at start + offsets."""
        return self.decode(self._inputs[length], self._start, slot, kv_len)

    def decode_kv_len(self, position: int) -> int:
        """The attended length of `fast` mode's decode step at `position` (its kv bucket)."""
        if not 0 <= position < self.max_len:
            raise ValueError(f"position {position} outside the slot length {self.max_len}")
        return round_up_kv_len(position + 1, self.max_len, self.kv_bucket)

    def decode(self, x: Tensor, start: Tensor, slot: int, kv_len: int) -> Tensor:
        """`fast` mode's decoder forward of x [1, T, H] (T = 1 or a prefill bucket) at positions start + [0, T)
        (`start`: a long device tensor of one element) -> post-norm hidden [1, T, H], through the compiled
        layers and without staging: what this runner's graphs capture, and what larger captured steps
        (workers/engine/token_steps.py) call inside theirs."""
        decoder = self.decoder
        input_pos = start + self._offsets[x.shape[1]]
        cos = decoder.rope_cos[input_pos].to(x.dtype)
        sin = decoder.rope_sin[input_pos].to(x.dtype)
        for index, layer in enumerate(decoder.layers):
            x = self._compiled_layer(layer, x, cos, sin, input_pos, slot, kv_len)
            if self.layer_probe is not None:
                self.layer_probe(index, x)
        return decoder.norm(x)

    def _prepare_shape(self, slot: int, length: int, kv_len: int) -> None:
        """Warm-up of one shape: compile it (first time) and capture its graph, or just run it on CPU."""
        self._inputs[length].zero_()
        self._start.fill_(kv_len - length)  # a start whose padded end falls in this kv bucket
        if self.cuda_graphs:
            if (slot, length, kv_len) not in self._graphs:
                self._capture(slot, length, kv_len)
        else:
            self._step(slot, length, kv_len)

    def _capture(self, slot: int, length: int, kv_len: int) -> torch.cuda.CUDAGraph:
        """Run the step twice on a side stream (compile, autotune), then capture it into a graph.

        The step only reads the staged inputs, so a capture during a live session leaves the cache as one
        replay of the new graph does.
        """
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._outputs[length].copy_(self._step(slot, length, kv_len))
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._outputs[length].copy_(self._step(slot, length, kv_len))
        self._graphs[(slot, length, kv_len)] = graph
        return graph
