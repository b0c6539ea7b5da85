"""Built-in token2wav (MODEL.md §7 and §4 "Vocoder streaming"): 25 Hz speech codes -> 24 kHz float32 PCM.

`Token2Wav` holds the weights and constant buffers (shared by every session), and the slot states below;
`Token2WavStream` (one per session, from `new_stream`) holds the code buffer and uses one
`Token2WavState`: the per-session tensors.

Slots: the engine calls `setup_slots(n)` with its KV slot count, and a session's stream runs on its slot
(`new_stream(clip, slot=...)`): the slot's `Token2WavState` is allocated once and reset for each new
stream, and its chunk step is a `CapturedCall` (workers/engine/graphs.py) over static input buffers, a
CUDA graph in `fast` mode on CUDA. `warmup_slots()` builds them all before sessions; a stream without
a slot owns a fresh state and calls `synthesize_chunk` directly. Both give the same PCM.

Prompt, once per session: the TTS voice clip (16 kHz) -> 80-bin log-mel at 50 frames/s -> a small speaker
encoder (convolutions + mean/std pooling; stands in for CAM++) gives the speaker vector, and the clip's
last `prompt_frames` mel frames run once through the flow ODE as the condition of a prompt prefix (with a
zero encoder condition: there is no speech tokenizer for the clip): the estimator keys/values of every
step and block, which every later chunk attends to. Without a clip the
speaker vector is zero and the prefix is empty. Turn caches start empty, so "restore the session's base
copy" at a new turn is zeroing them; the prompt prefix is never written after prepare.

Hot path: `synthesize_chunk` always takes `chunk_codes + lookahead` codes (padded with the silence code;
the valid count and the count of final codes are 0-dim device tensors), fixed-size caches updated in
place, and returns a fixed-size PCM buffer that the stream trims on the host: one graph-capturable shape.

Vocoder continuity (as the reference): the last HIFT_TAIL_FRAMES frames of each chunk are held back and
re-synthesised at the start of the next chunk, with the cached source excitation and a Hamming
cross-fade against the held-back audio. A turn's first chunk therefore yields 8 frames (160 ms) less
and its last chunk gives them back: pushes of 25 and 25 codes, then flush, give 20 160, 24 000 and
6 720 samples (53 codes with the 3-code silence prefix, 960 samples each).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.engine.graphs import SlotCalls
from workers.model.layers import INIT_STD, init_module_weights
from workers.model.mel import as_float_tensor, mel_filters
from workers.model.presets import Token2WavArgs
from workers.model.token2wav_flow import FRAMES_PER_CODE, Flow, streaming_mask, take
from workers.model.token2wav_hift import HARMONICS, HiFTVocoder

CODE_RATE_HZ = 25
MIN_NEW_CODES = 5  # synthesise once the buffer holds lookahead + 5 codes (MODEL.md §4)
HIFT_TAIL_FRAMES = 8  # held back per chunk and re-synthesised with a cross-fade
PROMPT_SAMPLE_RATE = 16000
PROMPT_N_FFT = 1024
PROMPT_WINDOW = 640  # 40 ms
PROMPT_HOP = 320  # 20 ms: 50 frames/s, the flow's frame rate
LOG_MEL_FLOOR = 1e-5


def prompt_log_mel(audio_16k: np.ndarray | Tensor, n_mels: int, device: torch.device) -> Tensor:
    """Natural-log magnitude mel [n_mels, frames] of 16 kHz audio at 50 frames/s (float32)."""
    samples = as_float_tensor(audio_16k, device).reshape(-1)
    if samples.numel() < PROMPT_N_FFT:
        samples = F.pad(samples, (0, PROMPT_N_FFT - samples.numel()))
    window = torch.hann_window(PROMPT_WINDOW, device=device)
    spectrum = torch.stft(samples, PROMPT_N_FFT, PROMPT_HOP, win_length=PROMPT_WINDOW, window=window,
                          center=True, return_complex=True).abs()
    mel = mel_filters(n_mels, PROMPT_N_FFT, PROMPT_SAMPLE_RATE, device) @ spectrum
    return mel.clamp(min=LOG_MEL_FLOOR).log()


class SpeakerEncoder(nn.Module):
    """Mel [B, n_mels, F] -> speaker vector [B, speaker_dim]: dilated convs, then mean/std pooling."""

    def __init__(self, n_mels: int, channels: int, speaker_dim: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(n_mels, channels, 5, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, dilation=2, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, dilation=3, padding=3), nn.ReLU())
        self.proj = nn.Linear(2 * channels, speaker_dim)

    def forward(self, mel: Tensor) -> Tensor:
        h = self.convs(mel)
        return self.proj(torch.cat([h.mean(dim=-1), h.std(dim=-1, unbiased=False)], dim=-1))


@dataclass
class Token2WavState:
    """One stream's tensors: `session` is written once at prepare, `turn` restarts empty every turn."""

    session: dict[str, Tensor]
    turn: dict[str, Tensor]

    def reset_turn(self) -> None:
        for tensor in self.turn.values():
            tensor.zero_()


class Token2Wav(nn.Module):
    """Speech codes -> 24 kHz waveform: flow (codes -> mel) + HiFT vocoder (mel -> waveform)."""

    def __init__(self, args: Token2WavArgs, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, prompt_frames: int = 150, history_frames: int = 100) -> None:
        """prompt_frames: prompt mel frames kept as the estimator prefix (3 s); history_frames: frames of
        the current turn the estimator attends to (2 s). Random init (normal 0.02), seeded by torch."""
        super().__init__()
        self.args = args
        self.window_codes = args.chunk_codes + args.lookahead
        self.prompt_frames = prompt_frames
        self.history_frames = history_frames
        with torch.device(device or "cpu"):
            self.speaker_encoder = SpeakerEncoder(args.n_mels, args.encoder_dim // 2, args.speaker_dim)
            self.flow = Flow(args)
            self.hift = HiFTVocoder(args)
            self.tail_samples = HIFT_TAIL_FRAMES * self.hift.frame_samples
            fade = torch.hamming_window(2 * self.tail_samples, periodic=False)
            self.register_buffer("fade_in", fade[:self.tail_samples].clone())
            self.register_buffer("fade_out", fade[self.tail_samples:].clone())
        if args.sample_rate != CODE_RATE_HZ * FRAMES_PER_CODE * self.hift.frame_samples:
            raise ValueError(f"upsample_rates x istft_hop give {self.hift.frame_samples} samples per frame, "
                             f"not {args.sample_rate // (CODE_RATE_HZ * FRAMES_PER_CODE)}")
        init_module_weights(self)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.ConvTranspose1d):
                    module.weight.normal_(0.0, INIT_STD)
                    module.bias.zero_()
        self.to(dtype).eval().requires_grad_(False)
        self._slots = self._slot_calls(0, cuda_graphs=False)

    @property
    def device(self) -> torch.device:
        return self.fade_in.device

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (works on the meta device); total = speaker_encoder + flow + vocoder."""
        parts = {"speaker_encoder": self.speaker_encoder, "flow": self.flow, "flow_encoder": self.flow.encoder,
                 "flow_estimator": self.flow.estimator, "vocoder": self.hift}
        counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def new_stream(self, prompt_audio_16k: np.ndarray | None, slot: int | None = None) -> Token2WavStream:
        """A session's stream, conditioned on the TTS voice clip (16 kHz float32) when given.

        With `slot` (see `setup_slots`) the stream runs on that slot's static state and chunk call and
        takes the slot over: an earlier stream on the slot refuses further chunks.
        """
        return Token2WavStream(self, prompt_audio_16k, slot)

    # ------------------------------------------------------------------------------------------ slots
    def setup_slots(self, slots: int, cuda_graphs: bool = False) -> None:
        """One static state and one chunk call per slot; `cuda_graphs` captures the calls (model on CUDA)."""
        self._slots = self._slot_calls(slots, cuda_graphs)

    def _slot_calls(self, slots: int, cuda_graphs: bool) -> SlotCalls[Token2WavState]:
        # The capture's warm-up runs must leave the turn caches as they were (`preserve`).
        return SlotCalls([self.new_state() for _ in range(slots)], self.synthesize_chunk, self.reset_state,
                         cuda_graphs, preserve=lambda state: list(state.turn.values()))

    @torch.inference_mode()
    def warmup_slots(self) -> None:
        """Build every slot's chunk call (capturing its graph) now; a build after this counts as late."""
        self._slots.warmup((torch.full((1, self.window_codes), self.args.silence_code, device=self.device),
                            torch.tensor(self.window_codes, device=self.device),
                            torch.tensor(self.args.chunk_codes, device=self.device)))

    @property
    def late_captures(self) -> int:
        """Chunk graphs captured after `warmup_slots()` (during live sessions; should be 0)."""
        return self._slots.late_captures

    @property
    def graph_count(self) -> int:
        """Slot chunk calls built so far (graphs when captured)."""
        return self._slots.graph_count

    def claim_slot(self, slot: int, stream: Token2WavStream) -> Token2WavState:
        """Hand `slot`'s state, reset to `new_state()`'s values, to `stream`."""
        return self._slots.claim(slot, stream)

    @torch.inference_mode()
    def synthesize_on_slot(self, stream: Token2WavStream, codes: Tensor, valid_codes: Tensor,
                           emit_codes: Tensor) -> Tensor:
        """`synthesize_chunk` on the stream's slot state through the slot's chunk call (built if new)."""
        return self._slots(stream.slot, stream, codes, valid_codes, emit_codes)

    # ------------------------------------------------------------------------------------------ state
    @torch.inference_mode()
    def new_state(self) -> Token2WavState:
        """Empty state: no prompt, zero speaker vector, empty turn caches."""
        args, device, dtype = self.args, self.device, self.fade_in.dtype

        def zeros(shape: tuple[int, ...], zeros_dtype: torch.dtype = dtype) -> Tensor:
            return torch.zeros(shape, device=device, dtype=zeros_dtype)

        encoder_caches = {f"encoder.{name}": zeros(shape)
                          for name, shape in self.flow.encoder.cache_shapes(1).items()}
        turn = {
            **encoder_caches,
            "estimator_history": zeros(self.flow.estimator_cache_shape(1, self.history_frames)),
            "emitted_codes": zeros((), torch.long),
            "hift_mel": zeros((1, args.n_mels, HIFT_TAIL_FRAMES)),
            "hift_source": zeros((1, 1, self.tail_samples)),
            "hift_speech": zeros((1, self.tail_samples)),
            "hift_phase": zeros((1, HARMONICS + 1), torch.float32),
            "hift_tail_valid": zeros((), torch.bool),
        }
        session = {
            "speaker": self._no_speaker(),
            "prompt_kv": zeros(self.flow.estimator_cache_shape(1, self.prompt_frames)),
            "prompt_valid": zeros((self.prompt_frames,), torch.bool),
        }
        return Token2WavState(session=session, turn=turn)

    @torch.inference_mode()
    def reset_state(self, state: Token2WavState) -> None:
        """Back to `new_state()`'s values, in place (the tensors keep their addresses)."""
        for tensor in state.session.values():
            tensor.zero_()
        state.session["speaker"].copy_(self._no_speaker())
        state.reset_turn()

    def _no_speaker(self) -> Tensor:
        """The speaker condition of a zero speaker vector (no voice clip)."""
        return self.flow.speaker_condition(torch.zeros(1, self.args.speaker_dim, device=self.device,
                                                       dtype=self.fade_in.dtype))

    @torch.inference_mode()
    def prepare_prompt(self, state: Token2WavState, prompt_audio_16k: np.ndarray | None) -> None:
        """Speaker vector and prompt prefix of `state` from the voice clip; a missing clip keeps the defaults."""
        if prompt_audio_16k is None or len(prompt_audio_16k) == 0:
            return
        dtype, frames = self.fade_in.dtype, self.prompt_frames
        mel = prompt_log_mel(prompt_audio_16k, self.args.n_mels, self.device).to(dtype)
        speaker = self.flow.speaker_condition(self.speaker_encoder(mel[None]))
        used = min(mel.size(1), frames)
        prompt_mel = torch.zeros(1, frames, self.args.n_mels, device=self.device, dtype=dtype)
        prompt_mel[0, frames - used:] = mel[:, -used:].t()  # right-aligned: the prompt ends at position -1
        valid = torch.arange(frames, device=self.device) >= frames - used
        positions = torch.arange(frames, device=self.device) - frames
        mask = streaming_mask(valid[:0], frames, window_valid=valid)
        _, prompt_kv = self.flow.solve(torch.zeros_like(prompt_mel), speaker, prompt_mel, positions, (), mask,
                                       keep_start=0, keep_length=frames)
        state.session["speaker"].copy_(speaker)
        state.session["prompt_kv"].copy_(prompt_kv)
        state.session["prompt_valid"].copy_(valid)

    @torch.inference_mode()
    def synthesize_chunk(self, state: Token2WavState, codes: Tensor, valid_codes: Tensor,
                         emit_codes: Tensor) -> Tensor:
        """One fixed-shape step: codes [1, chunk_codes + lookahead] (long), `valid_codes` of them real,
        the first `emit_codes` final (0-dim long tensors on the model's device).

        At most `chunk_codes` codes are final per call (the stream's buffer rule guarantees it), so the
        flow and the vocoder work on 2 * chunk_codes frames. Updates `state.turn` in place and returns
        PCM [(HIFT_TAIL_FRAMES + 2 * chunk_codes) * 480] float32 in [-1, 1] on int16 steps: the held-back
        tail of the previous chunk, then this chunk's frames. `output_span` says which part to play.
        """
        if codes.shape != (1, self.window_codes):
            raise ValueError(f"codes must have shape (1, {self.window_codes}), got {tuple(codes.shape)}")
        turn, session = state.turn, state.session
        frames = self.args.chunk_codes * FRAMES_PER_CODE
        emitted = turn["emitted_codes"]
        emit_frames = emit_codes * FRAMES_PER_CODE
        frame_index = torch.arange(frames, device=self.device)

        encoder_cache = {name.removeprefix("encoder."): value for name, value in turn.items()
                         if name.startswith("encoder.")}
        code_valid = torch.arange(self.window_codes, device=self.device) < valid_codes
        mu, encoder_cache = self.flow.encoder(codes, code_valid, emitted, emit_codes, encoder_cache)

        # flow matching over the window, attending to the prompt prefix and the turn's recent frames
        history = self.history_frames
        history_slots = torch.arange(history, device=self.device)
        history_valid = history_slots >= history - (emitted * FRAMES_PER_CODE).clamp(max=history)
        mask = streaming_mask(torch.cat([session["prompt_valid"], history_valid]), frames)
        mel, estimator_history = self.flow.solve(
            mu, session["speaker"], torch.zeros_like(mu), emitted * FRAMES_PER_CODE + frame_index,
            (session["prompt_kv"], turn["estimator_history"]), mask,
            keep_start=self.prompt_frames + emit_frames, keep_length=history)

        # vocoder over [held-back tail; this window]; frames after the final ones are zero, as end padding
        new_mel = torch.where((frame_index < emit_frames)[None, :, None], mel, 0.0).transpose(1, 2)
        vocoder_mel = torch.cat([turn["hift_mel"], new_mel], dim=2)
        tail_valid = turn["hift_tail_valid"]
        first_sample = (emitted * FRAMES_PER_CODE - HIFT_TAIL_FRAMES) * self.hift.frame_samples
        speech, source, phase = self.hift(vocoder_mel, turn["hift_source"], tail_valid, turn["hift_phase"],
                                          first_sample)
        head = speech[:, :self.tail_samples]
        faded = head * self.fade_in + turn["hift_speech"] * self.fade_out
        speech = torch.cat([torch.where(tail_valid, faded, head), speech[:, self.tail_samples:]], dim=1)

        emit_samples = emit_frames * self.hift.frame_samples
        updates = {f"encoder.{name}": value for name, value in encoder_cache.items()}
        updates.update({
            "estimator_history": estimator_history,
            "emitted_codes": emitted + emit_codes,
            "hift_mel": take(vocoder_mel, emit_frames, HIFT_TAIL_FRAMES, dim=2),
            "hift_source": take(source, emit_samples, self.tail_samples, dim=2),
            "hift_speech": take(speech, emit_samples, self.tail_samples, dim=1),
            "hift_phase": take(phase, (emit_samples - 1).clamp(min=0), 1, dim=2)[..., 0],
            "hift_tail_valid": torch.ones_like(tail_valid),
        })
        for name, value in updates.items():
            turn[name].copy_(value)
        pcm = speech[0].float().clamp(-1.0, 1.0)
        return torch.round(pcm * 32768.0).clamp(-32768.0, 32767.0) / 32768.0  # int16 steps, as the reference

    def output_span(self, tail_valid: bool, emit_codes: int, last: bool) -> tuple[int, int]:
        """[start, end) of `synthesize_chunk`'s PCM to play: from the held-back tail (or, at a turn's first
        chunk, after the empty one) up to this window's new tail (or its end on the last chunk)."""
        start = 0 if tail_valid else self.tail_samples
        end = emit_codes * FRAMES_PER_CODE * self.hift.frame_samples + (self.tail_samples if last else 0)
        return start, end


class Token2WavStream:
    """One session's vocoder stream: the MODEL.md §4 code buffer plus a `Token2WavState`. Not thread-safe."""

    def __init__(self, model: Token2Wav, prompt_audio_16k: np.ndarray | None, slot: int | None = None) -> None:
        self.model = model
        self.slot = slot
        self.state = model.new_state() if slot is None else model.claim_slot(slot, self)
        model.prepare_prompt(self.state, prompt_audio_16k)
        self.reset_turn()

    @torch.inference_mode()
    def reset_turn(self) -> None:
        """Back to the turn-start state: 3 silence codes buffered, turn caches empty."""
        self.state.reset_turn()
        self._buffer = [self.model.args.silence_code] * self.model.args.lookahead
        self._has_codes = False
        self._tail_valid = False  # host copy of state.turn["hift_tail_valid"]: trimming needs no sync

    def push(self, codes: list[int]) -> np.ndarray:
        """Append codes; synthesise every full chunk they complete. float32 24 kHz PCM, possibly empty."""
        args = self.model.args
        for code in codes:
            if not 0 <= code < args.num_codes:
                raise ValueError(f"speech code {code} outside [0, {args.num_codes})")
        self._buffer.extend(codes)
        self._has_codes = self._has_codes or bool(codes)
        pieces = []
        while len(self._buffer) >= args.lookahead + MIN_NEW_CODES:
            processed = min(self.model.window_codes, len(self._buffer))
            pieces.append(self._synthesize(self._buffer[:processed], last=False))
            del self._buffer[:processed - args.lookahead]  # the look-ahead codes stay for the next chunk
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def flush(self) -> np.ndarray:
        """End of turn: synthesise the rest as the last chunk, then reset to the turn-start state."""
        pcm = self._synthesize(self._buffer, last=True) if self._has_codes else np.zeros(0, dtype=np.float32)
        self.reset_turn()
        return pcm

    def _synthesize(self, codes: list[int], last: bool) -> np.ndarray:
        model = self.model
        emit = len(codes) if last else len(codes) - model.args.lookahead
        padded = codes + [model.args.silence_code] * (model.window_codes - len(codes))
        device = model.device
        inputs = (torch.tensor([padded], device=device), torch.tensor(len(codes), device=device),
                  torch.tensor(emit, device=device))
        if self.slot is None:
            pcm = model.synthesize_chunk(self.state, *inputs)
        else:
            pcm = model.synthesize_on_slot(self, *inputs)
        start, end = model.output_span(self._tail_valid, emit, last)
        self._tail_valid = True
        return pcm[start:end].cpu().numpy()
