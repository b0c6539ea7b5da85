"""Token-in, token-out decode steps of `fast` mode: the fed token's embedding, the decoder step and the step head
(LM head + decode rule, or code head + sampling) as one call, one CUDA graph per (KV slot, kv bucket).

Fed through `DecoderRunner.forward` and then a `DecodeHeads` call, a decode step costs, besides the two graph
replays, some ten small uploads, copies and launches between two steps: the token's upload and embedding, the
staging copy and the position, the head's input copies, the random draw, the recent-token write. Here the host
writes the step's few integers into a pinned control row, one copy uploads it, and one graph does the rest:

* `LLMTokenSteps`: (token fed, its position, recent-ring slot and id, text-only flag, random-number row)
  -> (chosen id, post-norm hidden state of the fed token). The session reads every chosen id before the
  next step (its schedule, terminators and text budget decide what is fed next).
* `TTSTokenSteps` (a `CodeStepper` of `MiniCPMTTS.generate_codes`): (position, step, EOS blocked) -> the next
  code, fed from the previous step's code on the device. Only an EOS stops a code loop, so the loop launches
  each step before reading the code of the one before (`lookahead` 1) and the device does not wait for the
  host between codes; the step launched after an EOS is left to finish and dropped (its K/V lies beyond
  the returned position, where the next feed overwrites it).

The graphs read per-slot state at fixed addresses: the LLM rule's settings rows, recent-token ring and this
unit's random numbers (`DecodeHeads.rule_states`); the TTS sampler's settings rows, recent codes, this call's
random numbers and the last code (`SamplerState`, kept here). The calls are built for every (slot, kv
bucket) by `warmup`; a graph captured or compiled by a call after it is counted in `late_captures` (part of
`DuplexEngine.recompiles_since_warmup()`). Without CUDA graphs (CPU) the same functions run on the same
buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from workers.engine.graphs import CapturedCall, CapturedCalls, Outputs
from workers.engine.heads import DecodeHeads
from workers.engine.runners import DecoderRunner, dynamo_graph_count
from workers.model.omni import OmniModel
from workers.model.tts import CODE_PENALTY_WINDOW

# An LLM step's control row.
_TOKEN, _POSITION, _RING_INDEX, _RING_TOKEN, _TEXT_ONLY, _UNIFORM_ROW = range(6)
# A TTS step's control row.
_CODE_POSITION, _CODE_STEP, _CODE_BLOCKED = range(3)
TTS_CODES_MAX = 64  # codes per `generate_codes` call that the TTS steps' buffers hold


def _host_rows(rows: int, size: int, device: torch.device) -> Tensor:
    """Host rows of long integers, pinned when `device` is CUDA (so copies to and from it do not wait)."""
    return torch.zeros(rows, size, dtype=torch.long, pin_memory=device.type == "cuda")


class _StepCalls:
    """`step(slot, kv_len, control)` as one `CapturedCall` per (slot, kv bucket of `runner`), built and called
    under the runner's kernel switches. `preserve(slot)`: the state tensors a step writes (see CapturedCall)."""

    def __init__(self, runner: DecoderRunner, step: Callable[[int, int, Tensor], Outputs],
                 preserve: Callable[[int], Sequence[Tensor]]) -> None:
        self.runner, self._step, self._preserve = runner, step, preserve
        self._calls = CapturedCalls(runner.cuda_graphs)
        self._late_compiles = 0

    @torch.no_grad()
    def warmup(self, slots: Sequence[int], example: Callable[[int], list[int]]) -> None:
        """Build every (slot, kv bucket) call; `example(position)` is a control row for a position."""
        for slot in slots:
            for kv_len in self.runner.kv_buckets:
                if (slot, kv_len) not in self._calls:
                    self._add(slot, kv_len, torch.tensor(example(kv_len - 1)))
        self._calls.warm = True

    @torch.no_grad()  # as the runner's calls: the compiled layers are guarded on it
    def __call__(self, slot: int, position: int, control: Tensor) -> Outputs:
        kv_len = self.runner.decode_kv_len(position)
        graphs_before = dynamo_graph_count()
        call = self._calls.get((slot, kv_len)) or self._add(slot, kv_len, control)
        if call.captured:
            outputs = call(control)
        else:
            with self.runner.kernel_switches():
                outputs = call(control)
        if self._calls.warm:
            self._late_compiles += dynamo_graph_count() - graphs_before
        return outputs

    @property
    def late_captures(self) -> int:
        """Graphs captured and dynamo graphs compiled by calls after `warmup()` (should be 0)."""
        return self._calls.late_captures + self._late_compiles

    def _add(self, slot: int, kv_len: int, example: Tensor) -> CapturedCall:
        with self.runner.kernel_switches():
            return self._calls.add((slot, kv_len), partial(self._step, slot, kv_len), [example.to(self.runner.device)],
                                   preserve=self._preserve(slot))


class LLMTokenSteps:
    """The LLM's decode step + LM head + decode rule per slot (see the module docstring). One call at a time
    (the engine's model thread): the calls share one host control row."""

    def __init__(self, model: OmniModel, runner: DecoderRunner, heads: DecodeHeads, slots: int) -> None:
        device = runner.device
        self.model, self.runner, self.heads = model, runner, heads
        # One row: each call reads its chosen id (a synchronisation) before the next writes the row again.
        self._control = _host_rows(1, 6, device)[0]
        self._control_values = self._control.numpy()
        self._calls = _StepCalls(runner, self._step, lambda slot: [heads.rule_states[slot].ring])

    def warmup(self, slots: Sequence[int]) -> None:
        self._calls.warmup(slots, lambda position: [0, position, 0, 0, 0, 0])

    def __call__(self, slot: int, token: int, position: int, ring_index: int, ring_token: int, text_only: bool,
                 uniform_row: int) -> tuple[int, Tensor]:
        """Feed `token` at `position` (after writing `ring_token` at `ring_index` of the recent ring), then run
        the rule with the text-only settings or not and the unit's random-number row `uniform_row`.
        Returns (chosen id, post-norm hidden state of the fed token [H])."""
        self._control_values[:] = (token, position, ring_index, ring_token, int(text_only), uniform_row)
        chosen, hidden = self._calls(slot, position, self._control)
        return int(chosen), hidden

    @property
    def late_captures(self) -> int:
        return self._calls.late_captures

    def _step(self, slot: int, kv_len: int, control: Tensor) -> tuple[Tensor, Tensor]:
        state = self.heads.rule_states[slot]
        state.ring.index_copy_(0, control[_RING_INDEX:_RING_INDEX + 1], control[_RING_TOKEN:_RING_TOKEN + 1])
        x = self.model.llm.embed(control[_TOKEN:_TOKEN + 1]).to(self.model.llm_dtype)
        hidden = self.runner.decode(x, control[_POSITION], slot, kv_len)
        settings = state.settings.index_select(0, control[_TEXT_ONLY:_TEXT_ONLY + 1])[0]
        uniforms = state.uniforms.index_select(0, control[_UNIFORM_ROW:_UNIFORM_ROW + 1])[0]
        return self.heads.llm_rule(hidden[:, -1], settings, state.ring, uniforms), hidden[0, -1]


@dataclass
class SamplerState:
    """One slot's inputs of the TTS sampler at fixed addresses."""

    settings: Tensor  # float32 [2, 3]: `sample_code` settings with EOS allowed and with EOS blocked
    recent: Tensor  # long [CODE_PENALTY_WINDOW]: this call's recent codes, -1 = empty
    uniforms: Tensor  # float32 [TTS_CODES_MAX]: this call's random numbers, one per code
    code: Tensor  # long [1]: the last code sampled, the next step's input


class TTSTokenSteps:
    """The TTS decode step + code head + sampling per slot, as the `CodeStepper` of `generate_codes` (see the
    module docstring). One `generate_codes` call at a time (the engine's model thread)."""

    lookahead = 1

    def __init__(self, model: OmniModel, runner: DecoderRunner, heads: DecodeHeads, slots: int) -> None:
        device = runner.device
        self.model, self.runner, self.heads = model, runner, heads
        self.states = [SamplerState(torch.ones(2, 3, device=device),
                                    torch.full((CODE_PENALTY_WINDOW,), -1, dtype=torch.long, device=device),
                                    torch.zeros(TTS_CODES_MAX, device=device),
                                    torch.zeros(1, dtype=torch.long, device=device)) for _ in range(slots)]
        # A row per step of a call: a step's row is uploaded while the host writes the next ones.
        self._controls = _host_rows(TTS_CODES_MAX, 3, device)
        self._control_values = self._controls.numpy()
        self._codes = _host_rows(TTS_CODES_MAX, 1, device)
        self._code_values = self._codes.numpy()
        self._events = [torch.cuda.Event() for _ in range(TTS_CODES_MAX)] if device.type == "cuda" else None
        self._calls = _StepCalls(runner, self._step, lambda slot: [self.states[slot].code, self.states[slot].recent])
        self._slot, self._last = 0, -1

    def warmup(self, slots: Sequence[int]) -> None:
        self._calls.warmup(slots, lambda position: [position, 0, 0])

    @property
    def late_captures(self) -> int:
        return self._calls.late_captures

    # ------------------------------------------------------------------------------- CodeStepper
    def start(self, slot: int, settings: Tensor, uniforms: Tensor) -> None:
        if uniforms.shape[0] > TTS_CODES_MAX:
            raise ValueError(f"at most {TTS_CODES_MAX} codes per call, asked for {uniforms.shape[0]}")
        state = self.states[slot]
        state.settings.copy_(settings)
        state.uniforms[:uniforms.shape[0]].copy_(uniforms)
        state.recent.fill_(-1)
        self._slot, self._last = slot, -1

    def first(self, hidden_last: Tensor, blocked: bool) -> int:
        """Code 0 from the prefill's post-norm hidden [1, H], through the captured head on its own."""
        state = self.states[self._slot]
        code = self.heads.tts(hidden_last, state.settings[int(blocked)], state.recent, state.uniforms[0:1])
        state.code.copy_(code)
        state.recent[0:1].copy_(code)
        return self._fetch(0, code)

    def next(self, step: int, position: int, blocked: bool) -> int:
        """Launch the step that feeds code step - 1 at `position` and samples code `step`."""
        self._control_values[step] = (position, step, int(blocked))
        return self._fetch(step, self._calls(self._slot, position, self._controls[step]))

    def read(self, step: int) -> int:
        if self._events is not None:
            self._events[step].synchronize()
        return int(self._code_values[step, 0])

    def finish(self) -> None:
        """Wait for the steps still running (the host rows are rewritten by the next call)."""
        if self._events is not None and self._last >= 0:
            self._events[self._last].synchronize()

    def _fetch(self, step: int, code: Tensor) -> int:
        """Start copying code `step` to the host; `read(step)` waits for it."""
        self._codes[step].copy_(code, non_blocking=True)
        if self._events is not None:
            self._events[step].record(torch.cuda.current_stream(self.runner.device))
        self._last = step
        return step

    def _step(self, slot: int, kv_len: int, control: Tensor) -> Tensor:
        state, tts = self.states[slot], self.model.tts
        x = tts.emb_code[0](state.code.view(1, 1)).to(self.model.llm_dtype)
        hidden = self.runner.decode(x, control[_CODE_POSITION], slot, kv_len)
        step = control[_CODE_STEP:_CODE_STEP + 1]
        settings = state.settings.index_select(0, control[_CODE_BLOCKED:_CODE_BLOCKED + 1])[0]
        code = self.heads.tts_sample(hidden[:, -1], settings, state.recent, state.uniforms.index_select(0, step))
        state.recent.index_copy_(0, step % CODE_PENALTY_WINDOW, code)
        state.code.copy_(code)
        return code
