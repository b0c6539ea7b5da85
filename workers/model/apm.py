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

Equivalence (tested): while the mel floor is fixed (buffer < 5 s) and no reset happened, the streaming
tokens of units 0..k-1 equal the offline path `encode_mel` on the same audio — convolutions over the whole
mel, then attention with a chunk-causal mask of 50-frame (1 s) chunks: frame i sees frame j iff
j // 50 <= i // 50. The 2 context frames are exactly what conv1 + conv2 need, so trimming changes nothing.
`encode_offline` (reference voice) is that offline path with Whisper's `max - 8` floor over the clip.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    """K/V of past encoder frames for every layer, preallocated to max_positions (batch 1)."""

    def __init__(self, layers: int, heads: int, head_dim: int, max_positions: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.keys = torch.zeros(layers, heads, max_positions, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k/v [1, heads, T, head_dim] after the cached frames; return all of them [1, heads, L + T, hd]."""
        end = self.length + k.shape[2]
        self.keys[layer, :, self.length:end] = k[0]
        self.values[layer, :, self.length:end] = v[0]
        return self.keys[layer, :, :end][None], self.values[layer, :, :end][None]

    def advance(self, frames: int) -> None:
        self.length += frames

    def reset(self) -> None:
        self.length = 0


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

    def forward(self, frames: Tensor, cache: WhisperKVCache | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        """frames [B, T, d] -> hidden [B, T, d]. With a cache, positions continue from its length and the
        frames attend to all cached frames as well (then the cache keeps them). attn_mask: bool [T, T]."""
        start = cache.length if cache is not None else 0
        x = frames + self.embed_positions.weight[start:start + frames.shape[1]]
        for index, layer in enumerate(self.layers):
            x = layer(x, cache, index, attn_mask)
        if cache is not None:
            cache.advance(frames.shape[1])
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


class StreamingAudioEncoder:
    """One per session: owns the sample queue, the streaming mel and the Whisper KV cache."""

    def __init__(self, model: AudioTower) -> None:
        self.apm = model.apm
        self.projection = model.audio_projection_layer
        self.pooler = model.audio_avg_pooler
        device = self.apm.layer_norm.weight.device
        self.mel = StreamingLogMel(UNIT_MEL_FRAMES, MEL_CONTEXT_FRAMES, device=device)
        self.cache: WhisperKVCache | None = None  # allocated on the first unit
        self.reset()

    def reset(self) -> None:
        """Forget all audio: sample queue, mel buffer, Whisper cache."""
        self.pending = np.zeros(0, dtype=np.float32)
        self.mel.reset()
        if self.cache is not None:
            self.cache.reset()
        self.units = 0
        self.cache_resets = 0

    @property
    def unit_samples(self) -> int:
        """New samples the next unit needs in total (16 560 for the first unit, 16 000 afterwards)."""
        return FIRST_UNIT_SAMPLES if self.units == 0 else UNIT_SAMPLES

    @property
    def cache_length(self) -> int:
        return 0 if self.cache is None else self.cache.length

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
        weight = self.projection.linear2.weight
        outputs = [torch.zeros(0, weight.shape[0], device=weight.device, dtype=weight.dtype)]
        while self.ready_units > 0:
            outputs.append(self.encode_next_unit())
        return torch.cat(outputs)

    def _encode_unit(self, mel: Tensor) -> Tensor:
        frames = self.apm.embed_mel(mel[None])
        left = MEL_CONTEXT_FRAMES // 2 if self.units > 0 else 0
        frames = frames[:, left:left + UNIT_MEL_FRAMES // 2]
        if self.cache is None:
            self.cache = self.apm.new_cache()
        if self.cache.length + frames.shape[1] >= self.apm.args.max_positions:
            self.cache.reset()
            self.cache_resets += 1
        hidden = self.apm(frames, cache=self.cache)
        self.units += 1
        return self._tokens(hidden)[0]

    def _tokens(self, hidden: Tensor) -> Tensor:
        """Encoder hidden [B, T, d] -> projected, pooled tokens [B, T // pool, llm_hidden]."""
        projected = self.projection(hidden)
        return self.pooler(projected.transpose(1, 2)).transpose(1, 2)

    @torch.inference_mode()
    def encode_mel(self, mel: Tensor) -> Tensor:
        """Offline path on mel [80, T]: whole-sequence convolutions, chunk-causal attention (1 s chunks),
        projection, pooling -> [tokens, llm_hidden]. Segments of 30 s are encoded independently."""
        outputs = []
        for start in range(0, mel.shape[1], OFFLINE_SEGMENT_MEL_FRAMES):
            frames = self.apm.embed_mel(mel[None, :, start:start + OFFLINE_SEGMENT_MEL_FRAMES])
            mask = chunk_causal_mask(frames.shape[1], ENCODER_FRAMES_PER_S, frames.device)
            outputs.append(self._tokens(self.apm(frames, attn_mask=mask))[0])
        return torch.cat(outputs)

    def encode_offline(self, samples: np.ndarray) -> Tensor:
        """Reference-voice path: the whole clip with Whisper's `max - 8` floor -> [≈10 per s, llm_hidden]."""
        if len(samples) < SAMPLE_RATE // 10:
            raise ValueError("reference audio is shorter than 0.1 s")
        wave = as_float_tensor(samples, self.apm.layer_norm.weight.device)
        return self.encode_mel(log_mel_spectrogram(wave))
