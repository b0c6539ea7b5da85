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
which `DuplexEngine.recompiles_since_warmup()` reports and which must stay 0. `SlotCalls` adds what
per-slot calls need (token2wav chunks, streaming audio units): a fixed state per slot and its one user.

The decoders' graphs (`workers/engine/runners.py`) follow the same recipe inside `DecoderRunner`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import Generic, TypeVar

import torch
from torch import Tensor

Outputs = Tensor | tuple[Tensor, ...]
State = TypeVar("State")


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

        The results are fresh tensors: later calls do not overwrite them. The copies do not wait for the
        device, so a pinned host input must not be rewritten before the device has read it.
        """
        if len(inputs) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs, got {len(inputs)}")
        for static, value in zip(self.inputs, inputs, strict=True):
            if value.shape != static.shape:
                raise ValueError(f"input shape {tuple(value.shape)} differs from the captured "
                                 f"{tuple(static.shape)}")
            static.copy_(value, non_blocking=True)  # a pinned host source does not wait for the device
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


class SlotCalls(Generic[State]):
    """Per KV slot: a state with fixed addresses (caches a graph reads and writes), the one user that may
    run on it, and the slot's `CapturedCall` of `step(state, *inputs)`.

    A user (a session's token2wav stream, its audio encoder) `claim`s its slot: the state is reset and
    an earlier user of the slot is refused from then on. `warmup(example)` builds every slot's call;
    a call first built later is counted in `late_captures` when it captured a graph.

    Args:
        states: one state per slot.
        step: the fixed-shape computation; takes the slot's state, then the call's tensor inputs.
        reset: restores a state to its fresh values (on claim).
        cuda_graphs: capture the calls (every tensor on one CUDA device).
        preserve: the tensors of a state that `step` writes and the capture's warm-up runs must not
            change (see `CapturedCall`).
    """

    def __init__(self, states: list[State], step: Callable[..., Outputs], reset: Callable[[State], None],
                 cuda_graphs: bool, preserve: Callable[[State], Sequence[Tensor]] = lambda state: ()) -> None:
        self.states = states
        self._step, self._reset, self._preserve = step, reset, preserve
        self._owners: list[object | None] = [None] * len(states)
        self._calls = CapturedCalls(cuda_graphs)

    def claim(self, slot: int, owner: object) -> State:
        """Reset `slot`'s state and hand it to `owner`; the slot's previous owner is refused afterwards."""
        if not 0 <= slot < len(self.states):
            raise ValueError(f"slot {slot} outside the {len(self.states)} slots")
        state = self.states[slot]
        self._reset(state)
        self._owners[slot] = owner
        return state

    def __call__(self, slot: int, owner: object, *inputs: Tensor) -> Outputs:
        """`step` on the slot's state through the slot's call (built now, with `inputs` as example, if new)."""
        if self._owners[slot] is not owner:
            raise RuntimeError(f"slot {slot} is not held by this user (a newer one took it over)")
        call = self._calls.get(slot) or self._add(slot, inputs)
        return call(*inputs)

    def warmup(self, example_inputs: Sequence[Tensor]) -> None:
        """Build (capture) every slot's call now; a call built after this counts as late."""
        for slot in range(len(self.states)):
            if slot not in self._calls:
                self._add(slot, example_inputs)
        self._calls.warm = True

    @property
    def late_captures(self) -> int:
        """Graphs captured after `warmup()` (during live sessions; should be 0)."""
        return self._calls.late_captures

    @property
    def graph_count(self) -> int:
        """Slot calls built so far (graphs when captured)."""
        return len(self._calls)

    def _add(self, slot: int, example_inputs: Sequence[Tensor]) -> CapturedCall:
        state = self.states[slot]
        return self._calls.add(slot, partial(self._step, state), example_inputs, preserve=self._preserve(state))
