"""Hand-captured CUDA graphs for fixed-shape calls outside the decoders (token2wav chunks, vision images).

`CapturedCall(fn, example_inputs, cuda_graph=...)` serves `fn(*tensors) -> Tensor | tuple[Tensor, ...]`
for one fixed set of input shapes. It owns static input buffers; each call copies its inputs into them,
then either replays the graph captured at construction (CUDA) or calls `fn` on the static buffers
(CPU, or graphs off): the same code path on both, so the CPU tests cover what the graph replays.

`fn` may read and write tensors other than its inputs (a stream's caches, module buffers): a graph
keeps their addresses, so they must stay the same tensors for the call's lifetime. Capturing runs `fn`
twice on a side stream (compiling and autotuning whatever it compiles), so tensors it mutates must be
listed in `preserve`: they are restored after those runs, and the capture itself executes nothing.

`CapturedCalls` keeps one `CapturedCall` per key (a KV slot, an image patch grid) in one memory pool
and counts the graphs captured after its owner's warm-up: each is a capture during a live session,
which `DuplexEngine.recompiles_since_warmup()` reports and which must stay 0.

The decoders' graphs (`workers/engine/runners.py`) follow the same recipe inside `DecoderRunner`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

Outputs = Tensor | tuple[Tensor, ...]


class CapturedCall:
    """`fn` on static input buffers, replayed as a CUDA graph when `cuda_graph` is set.

    Args:
        fn: the computation; takes the static inputs positionally, returns a tensor or a tuple of tensors
            that do not alias its inputs.
        example_inputs: inputs of the fixed shapes and dtypes (copied into the static buffers, and what
            the capture's warm-up runs see).
        cuda_graph: capture a graph now (every tensor `fn` touches must be on one CUDA device).
        pool: the graph memory pool to share with other captures (`torch.cuda.graph_pool_handle()`).
        preserve: tensors `fn` writes in place; restored after the capture's warm-up runs.
    """

    def __init__(self, fn: Callable[..., Outputs], example_inputs: Sequence[Tensor], *, cuda_graph: bool,
                 pool: tuple[int, int] | None = None, preserve: Sequence[Tensor] = ()) -> None:
        self.fn = fn
        self.inputs = tuple(example.detach().clone() for example in example_inputs)
        self.cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._outputs: tuple[Tensor, ...] = ()
        self._single_output = True
        if cuda_graph:
            self._capture(pool, preserve)

    def __call__(self, *inputs: Tensor) -> Outputs:
        """Copy `inputs` into the static buffers (same shapes; dtype and device are converted), run.

        The results are fresh tensors: later calls do not overwrite them.
        """
        if len(inputs) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs, got {len(inputs)}")
        for static, value in zip(self.inputs, inputs, strict=True):
            if value.shape != static.shape:
                raise ValueError(f"input shape {tuple(value.shape)} differs from the captured "
                                 f"{tuple(static.shape)}")
            static.copy_(value)
        if self._graph is None:
            return self.fn(*self.inputs)
        self._graph.replay()
        outputs = tuple(output.clone() for output in self._outputs)
        return outputs[0] if self._single_output else outputs

    def _capture(self, pool: tuple[int, int] | None, preserve: Sequence[Tensor]) -> None:
        """Two warm-up runs on a side stream, then the capture, whose outputs are copied into static
        output buffers allocated outside the graph pool (nothing allocated in the pool outlives a replay)."""
        device = self.inputs[0].device
        saved = [tensor.clone() for tensor in preserve]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                warm = self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        for tensor, value in zip(preserve, saved, strict=True):
            tensor.copy_(value)
        self._outputs = tuple(torch.empty_like(output) for output in warm)
        del warm
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            for static, output in zip(self._outputs, self._run(), strict=True):
                static.copy_(output)
        self._graph = graph

    def _run(self) -> tuple[Tensor, ...]:
        """`fn` on the static inputs, its result as a tuple (noting whether it was a single tensor)."""
        result = self.fn(*self.inputs)
        self._single_output = isinstance(result, Tensor)
        return (result,) if isinstance(result, Tensor) else tuple(result)

    @property
    def captured(self) -> bool:
        """Whether calls replay a CUDA graph."""
        return self._graph is not None


class CapturedCalls:
    """`CapturedCall`s by key, sharing one graph memory pool; counts captures after the warm-up.

    The owner builds the calls its warm-up covers, then sets `warm`; a key first met afterwards is
    built on first use and, when that captures a graph, counted in `late_captures`.
    """

    def __init__(self, cuda_graphs: bool) -> None:
        self.cuda_graphs = cuda_graphs
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.warm = False
        self.late_captures = 0
        self._calls: dict[Hashable, CapturedCall] = {}

    def get(self, key: Hashable) -> CapturedCall | None:
        return self._calls.get(key)

    def add(self, key: Hashable, fn: Callable[..., Outputs], example_inputs: Sequence[Tensor],
            preserve: Sequence[Tensor] = ()) -> CapturedCall:
        """Build (and on CUDA capture) the call of `key`, replacing any earlier one."""
        call = CapturedCall(fn, example_inputs, cuda_graph=self.cuda_graphs, pool=self.pool, preserve=preserve)
        self.late_captures += int(self.warm and call.captured)
        self._calls[key] = call
        return call

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._calls
