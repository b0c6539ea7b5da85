"""Whisper audio encoder (`apm.`), audio projection and the per-session streaming audio path.

Modules (MODEL.md §2.1-2.2): `WhisperEncoder` — conv1 (k3 s1) -> GELU -> conv2 (k3 s2, 50 frames/s) ->
+ learned positions -> pre-LN layers (k_proj without bias) -> layer_norm; `AudioProjection` —
linear1 -> ReLU -> linear2; the model's `audio_avg_pooler` (AvgPool1d(5, 5)) then gives 10 tokens/s.

Streaming (`StreamingAudioEncoder`, one per session, MODEL.md §4 step 4): a unit is 1 s of audio (the
first needs 16 560 samples, later ones 16 000 new samples). Its 100 core mel frames plus 2 context frames
per side (none before the first unit) go through the convolutions; the context is trimmed after conv2,
leaving 50 frames. Those attend bidirectionally to each other and to every frame cached since the last
reset (the Whisper KV cache, positions continuing from its length); the cache is reset when it would
reach 1500 positions (≈ 30 s).

Fixed shapes (`encode_unit`, one CUDA graph per KV slot in fast mode): every unit is the same tensor work.
The first unit's window is left-padded to 104 frames and a device flag zeroes conv1's output over the
padding (see `WhisperEncoder.embed_unit`); the new K/V are written at the cache's length, a device scalar,
by index, and attention runs over all 1500 cache rows with a mask of the valid ones — the same keys as
attending to the valid rows only, so the same tokens. The engine owns one cache and one unit call per
slot (`StreamingAudioSlots`); a session's encoder runs on its slot's.

Equivalence (tested): while the mel floor is fixed (buffer < 5 s) and no reset happened, the streaming
tokens of units 0..k-1 equal the offline path `encode_mel` on the same audio — convolutions over the whole
mel, then attention with a chunk-causal mask of 50-frame (1 s) chunks: frame i sees frame j iff
j // 50 <= i // 50. The 2 context frames are exactly what conv1 + conv2 need, so trimming changes nothing.
`encode_offline` (reference voice) is that offline path with Whisper's `max - 8` floor over the clip.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.engine.graphs import SlotCalls
from workers.model.layers import init_module_weights
from workers.model.mel import HOP, SAMPLE_RATE, StreamingLogMel, as_float_tensor, log_mel_spectrogram
from workers.model.presets import AudioArgs

FIRST_UNIT_SAMPLES = 16_560  # 1.035 s: 1 s + right context + half an FFT window (+ 40 spare samples)
UNIT_SAMPLES = 16_000
UNIT_MEL_FRAMES = UNIT_SAMPLES // HOP  # 100 mel frames -> 50 encoder frames -> 10 tokens
MEL_CONTEXT_FRAMES = 2  # per side; one encoder frame after conv2's stride 2
ENCODER_FRAMES_PER_S = 50
OFFLINE_SEGMENT_MEL_FRAMES = 3000  # 30 s; the position table holds 1500 encoder frames


class WhisperKVCache:
    """K/V of a stream's encoder frames for every layer: max_positions rows (batch 1), fixed addresses.

    Rows [0, length) hold the frames since the last reset. `length` is kept on the host and, for a captured
    graph, in the device scalar `start` (updated in place): a unit writes its frames at rows start.. by index
    and attends over every row with a mask of the valid ones, so its shapes never change.
    """

    def __init__(self, layers: int, heads: int, head_dim: int, max_positions: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.keys = torch.zeros(layers, heads, max_positions, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.rows = torch.arange(max_positions, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.length = 0

    @property
    def max_positions(self) -> int:
        return self.keys.shape[2]

    def positions(self, frames: int) -> Tensor:
        """Rows (= positions) of the next `frames` frames: start + [0, frames)."""
        return self.start + self.rows[:frames]

    def visible(self, frames: int) -> Tensor:
        """bool [1, max_positions]: the cached rows and the next `frames` ones."""
        return (self.rows < self.start + frames)[None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k/v [1, heads, T, head_dim] at rows start..start + T; return every row [1, heads, max, hd]."""
        positions = self.positions(k.shape[2])
        self.keys[layer].index_copy_(1, positions, k[0])
        self.values[layer].index_copy_(1, positions, v[0])
        return self.keys[layer][None], self.values[layer][None]

    @torch.inference_mode()
    def advance(self, frames: int) -> None:
        self.length += frames
        self.start.fill_(self.length)

    @torch.inference_mode()
    def reset(self) -> None:
        """Empty (stale rows stay but are masked out: they add exact zeros to the attention)."""
        self.length = 0
        self.start.zero_()

    @torch.inference_mode()
    def clear(self) -> None:
        """Empty, with zeroed rows: a new owner cannot meet a previous stream's values (even non-finite ones)."""
        self.reset()
        self.keys.zero_()
        self.values.zero_()


class WhisperAttention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, cache: WhisperKVCache | None, layer: int, attn_mask: Tensor | None) -> Tensor:
        batch, length, d_model = x.shape
        q, k, v = (proj(x).view(batch, length, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, d_model))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, args: AudioArgs) -> None:
        super().__init__()
        self.self_attn = WhisperAttention(args.d_model, args.heads)
        self.self_attn_layer_norm = nn.LayerNorm(args.d_model, eps=args.ln_eps)
        self.fc1 = nn.Linear(args.d_model, args.ffn)
        self.fc2 = nn.Linear(args.ffn, args.d_model)
        self.final_layer_norm = nn.LayerNorm(args.d_model, eps=args.ln_eps)

    def forward(self, x: Tensor, cache: WhisperKVCache | None, layer: int, attn_mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), cache, layer, attn_mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """`apm.`: `embed_mel` (convolutions) then `forward` (positions, layers, final norm)."""

    def __init__(self, args: AudioArgs) -> None:
        super().__init__()
        self.args = args
        self.conv1 = nn.Conv1d(args.n_mels, args.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(args.d_model, args.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(args.max_positions, args.d_model)
        self.layers = nn.ModuleList(WhisperEncoderLayer(args) for _ in range(args.layers))
        self.layer_norm = nn.LayerNorm(args.d_model, eps=args.ln_eps)

    def init_weights(self) -> None:
        """Random init (MODEL.md §2.4)."""
        init_module_weights(self)

    def new_cache(self) -> WhisperKVCache:
        weight = self.layer_norm.weight
        return WhisperKVCache(len(self.layers), self.args.heads, self.args.d_model // self.args.heads,
                              self.args.max_positions, weight.device, weight.dtype)

    def embed_mel(self, mel: Tensor) -> Tensor:
        """mel [B, n_mels, T] -> encoder frames [B, ceil(T / 2), d_model] (before positions)."""
        mel = mel.to(self.conv1.weight.dtype)
        return F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)

    def embed_unit(self, window: Tensor, first_unit: Tensor) -> Tensor:
        """A streaming unit's mel window [n_mels, 104] -> its 50 encoder frames [1, 50, d] (fixed shapes).

        The window is the unit's 100 core frames with 2 context frames per side. The first unit has no left
        context: its 102 frames come left-padded with 2 zero frames (= conv1's zero padding) and
        `first_unit` (bool, 0-dim) zeroes conv1's output there (= conv2's zero padding), so both cases are
        the core frames [1, 51) after conv2, equal to convolving the unpadded window.
        """
        mel = window[None].to(self.conv1.weight.dtype)
        hidden = F.gelu(self.conv1(mel))
        padding = torch.arange(window.shape[1], device=window.device) < MEL_CONTEXT_FRAMES * first_unit
        hidden = hidden.masked_fill(padding, 0.0)
        frames = F.gelu(self.conv2(hidden)).transpose(1, 2)
        left = MEL_CONTEXT_FRAMES // 2
        return frames[:, left:left + UNIT_MEL_FRAMES // 2]

    def forward(self, frames: Tensor, cache: WhisperKVCache | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        """frames [B, T, d] -> hidden [B, T, d]; attn_mask: bool [T, T] (no cache).

        With a cache (batch 1), positions continue from its length and the frames attend to every cached
        frame as well; their K/V are stored in the cache, which the caller then advances by T.
        """
        if cache is None:
            x = frames + self.embed_positions.weight[:frames.shape[1]]
        else:
            x = frames + self.embed_positions(cache.positions(frames.shape[1]))
            attn_mask = cache.visible(frames.shape[1])
        for index, layer in enumerate(self.layers):
            x = layer(x, cache, index, attn_mask)
        return self.layer_norm(x)


class AudioProjection(nn.Module):
    """`audio_projection_layer.`: linear1 (ffn // 4 -> hidden) -> ReLU -> linear2 (hidden -> LLM hidden)."""

    def __init__(self, args: AudioArgs) -> None:
        super().__init__()
        self.linear1 = nn.Linear(args.ffn // 4, args.projection_hidden)
        self.linear2 = nn.Linear(args.projection_hidden, args.llm_hidden)

    def init_weights(self) -> None:
        """Random init (MODEL.md §2.4)."""
        init_module_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.relu(self.linear1(x)))


def build_audio_pooler(args: AudioArgs) -> nn.AvgPool1d:
    """`audio_avg_pooler`: average of every `pool_step` encoder frames (50 frames/s -> 10 tokens/s)."""
    return nn.AvgPool1d(args.pool_step, stride=args.pool_step)


def chunk_causal_mask(frames: int, chunk: int, device: torch.device | str | None = None) -> Tensor:
    """bool [frames, frames]: frame i may attend to frame j iff j // chunk <= i // chunk."""
    chunk_index = torch.arange(frames, device=device) // chunk
    return chunk_index[None, :] <= chunk_index[:, None]


class AudioTower(Protocol):
    """What the audio path needs from the model (OmniModel provides these attributes)."""

    apm: WhisperEncoder
    audio_projection_layer: AudioProjection
    audio_avg_pooler: nn.AvgPool1d


def audio_tokens(model: AudioTower, hidden: Tensor) -> Tensor:
    """Encoder hidden [B, T, d] -> projected, pooled tokens [B, T // pool, llm_hidden]."""
    projected = model.audio_projection_layer(hidden)
    return model.audio_avg_pooler(projected.transpose(1, 2)).transpose(1, 2)


def encode_unit(model: AudioTower, cache: WhisperKVCache, window: Tensor, first_unit: Tensor) -> Tensor:
    """One streaming unit in fixed shapes: mel window [n_mels, 104] -> tokens [10, llm_hidden].

    Writes the unit's K/V at the cache's rows start.. and leaves advancing the cache to the caller (a
    captured graph replays tensor work only). `first_unit`: bool 0-dim, see `WhisperEncoder.embed_unit`.
    """
    frames = model.apm.embed_unit(window, first_unit)
    return audio_tokens(model, model.apm(frames, cache=cache))[0]


class StreamingAudioSlots(SlotCalls[WhisperKVCache]):
    """The engine's streaming audio states: a Whisper KV cache and a unit call per KV slot.

    A session's `StreamingAudioEncoder` claims its slot's cache (cleared) and runs `encode_unit` through
    the slot's `CapturedCall` (workers/engine/graphs.py `SlotCalls`): a CUDA graph with `cuda_graphs`
    (fast mode on CUDA), the same call on static buffers otherwise. `warmup()` builds every slot's call
    before sessions; a call first built later counts in `late_captures`. Nothing needs preserving during
    a capture: its warm-up runs only write the K/V rows of the cache's current unit, which the next real
    call writes again (and a claim clears the whole cache).
    """

    def __init__(self, model: AudioTower, slots: int, cuda_graphs: bool = False) -> None:
        super().__init__([model.apm.new_cache() for _ in range(slots)], partial(encode_unit, model),
                         WhisperKVCache.clear, cuda_graphs)
        self.model = model

    @property
    def caches(self) -> list[WhisperKVCache]:
        return self.states

    @torch.inference_mode()
    def warmup(self) -> None:  # type: ignore[override]
        """Build (capture) every slot's unit call now; a build after this counts as late."""
        device = self.model.apm.layer_norm.weight.device
        window = torch.zeros(self.model.apm.args.n_mels, UNIT_MEL_FRAMES + 2 * MEL_CONTEXT_FRAMES, device=device)
        super().warmup((window, torch.tensor(False, device=device)))


class StreamingAudioEncoder:
    """One per session: the sample queue and the streaming mel, on a Whisper KV cache of its own or, with
    `slots` and `slot`, on that engine slot's cache and unit call (taking the slot over). Both run
    `encode_unit` and give the same tokens."""

    def __init__(self, model: AudioTower, slots: StreamingAudioSlots | None = None,
                 slot: int | None = None) -> None:
        if (slots is None) != (slot is None):
            raise ValueError("pass both slots and slot, or neither")
        self.model = model
        self.apm = model.apm
        device = self.apm.layer_norm.weight.device
        self.mel = StreamingLogMel(UNIT_MEL_FRAMES, MEL_CONTEXT_FRAMES, device=device)
        self.slots, self.slot = slots, slot
        self.cache = self.apm.new_cache() if slots is None else slots.claim(slot, self)
        self._first_unit_flags = {flag: torch.tensor(flag, device=device) for flag in (False, True)}
        self.reset()

    def reset(self) -> None:
        """Forget all audio: sample queue, mel buffer, Whisper cache."""
        self.pending = np.zeros(0, dtype=np.float32)
        self.mel.reset()
        self.cache.reset()
        self.units = 0
        self.cache_resets = 0

    @property
    def unit_samples(self) -> int:
        """New samples the next unit needs in total (16 560 for the first unit, 16 000 afterwards)."""
        return FIRST_UNIT_SAMPLES if self.units == 0 else UNIT_SAMPLES

    @property
    def cache_length(self) -> int:
        return self.cache.length

    @property
    def ready_units(self) -> int:
        """Complete units waiting in the sample queue."""
        queued = self.pending.size
        if self.units == 0:
            return 0 if queued < FIRST_UNIT_SAMPLES else 1 + (queued - FIRST_UNIT_SAMPLES) // UNIT_SAMPLES
        return queued // UNIT_SAMPLES

    def push(self, samples: np.ndarray) -> None:
        """Queue float32 16 kHz samples without encoding them."""
        self.pending = np.concatenate([self.pending, np.asarray(samples, dtype=np.float32)])

    @torch.inference_mode()
    def encode_next_unit(self) -> Tensor:
        """Encode the oldest complete queued unit: [10, llm_hidden]."""
        if self.ready_units == 0:
            raise RuntimeError(f"no complete unit queued ({self.pending.size} of {self.unit_samples} samples)")
        unit, self.pending = self.pending[:self.unit_samples], self.pending[self.unit_samples:]
        self.mel.push(unit)
        mel = self.mel.next_unit()
        if mel is None:
            raise RuntimeError("streaming mel has no stable unit after a full unit of samples")
        return self._encode_unit(mel)

    def feed(self, samples: np.ndarray) -> Tensor:
        """Queue samples and encode every complete unit: [10 * units, llm_hidden] (0 rows when none)."""
        self.push(samples)
        weight = self.model.audio_projection_layer.linear2.weight
        outputs = [torch.zeros(0, weight.shape[0], device=weight.device, dtype=weight.dtype)]
        while self.ready_units > 0:
            outputs.append(self.encode_next_unit())
        return torch.cat(outputs)

    def _encode_unit(self, mel: Tensor) -> Tensor:
        """Mel window [n_mels, 102 (first unit, no left context) or 104] -> tokens [10, llm_hidden]."""
        first = self.units == 0
        window = F.pad(mel, (MEL_CONTEXT_FRAMES, 0)) if first else mel
        frames = UNIT_MEL_FRAMES // 2
        if self.cache.length + frames >= self.cache.max_positions:
            self.cache.reset()
            self.cache_resets += 1
        first_unit = self._first_unit_flags[first]
        if self.slots is None:
            tokens = encode_unit(self.model, self.cache, window, first_unit)
        else:
            tokens = self.slots(self.slot, self, window, first_unit)
        self.cache.advance(frames)
        self.units += 1
        return tokens

    @torch.inference_mode()
    def encode_mel(self, mel: Tensor) -> Tensor:
        """Offline path on mel [80, T]: whole-sequence convolutions, chunk-causal attention (1 s chunks),
        projection, pooling -> [tokens, llm_hidden]. Segments of 30 s are encoded independently."""
        outputs = []
        for start in range(0, mel.shape[1], OFFLINE_SEGMENT_MEL_FRAMES):
            frames = self.apm.embed_mel(mel[None, :, start:start + OFFLINE_SEGMENT_MEL_FRAMES])
            mask = chunk_causal_mask(frames.shape[1], ENCODER_FRAMES_PER_S, frames.device)
            outputs.append(audio_tokens(self.model, self.apm(frames, attn_mask=mask))[0])
        return torch.cat(outputs)

    def encode_offline(self, samples: np.ndarray) -> Tensor:
        """Reference-voice path: the whole clip with Whisper's `max - 8` floor -> [≈10 per s, llm_hidden]."""
        if len(samples) < SAMPLE_RATE // 10:
            raise ValueError("reference audio is shorter than 0.1 s")
        wave = as_float_tensor(samples, self.apm.layer_norm.weight.device)
        return self.encode_mel(log_mel_spectrogram(wave))
