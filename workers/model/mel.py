"""Whisper-style 80-bin log-mel features of 16 kHz audio, offline and streaming (MODEL.md §4 step 4).

Definition (identical in both paths, float32):
* STFT: n_fft 400, hop 160, periodic Hann window, centred frames (reflect padding of 200 samples);
  frame t is centred on sample 160·t and the last frame is dropped, so n samples give n // 160 frames.
* power spectrum -> Slaney-style mel filterbank (80 bins, 0-8 kHz, area-normalised triangles, as
  Whisper's) -> log10 of max(power, 1e-10) -> floor -> (x + 4) / 4.
* floor: `max - 8` over the whole buffer (Whisper), or a fixed value. The streaming path uses −10 while its
  buffer holds less than 5 s and `max − 8` from then on.

Streaming (`StreamingLogMel`): each unit sees the mel of the whole accumulated buffer (the floor's max
runs over all of it) but only *stable* frames are used — frame t is stable once sample 160·t + 200 has
arrived (its window no longer reaches past the end). Stable frames never change, so their log-power is
cached and only the newer frames are transformed; the result equals a full recompute over the buffer.
A unit emits its 100 core frames plus 2 frames of context on each side (none before the first unit) for
the encoder's convolutions. When the buffer reaches 30 s its oldest 10 s are dropped (1000 frames; frame
indices stay global) and the two frames at the new start, which see reflect padding, are recomputed.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 80
LOG_POWER_MIN = 1e-10
DYNAMIC_RANGE = 8.0  # Whisper floor: max - 8 (log10 units)
STREAM_FIXED_FLOOR = -10.0  # streaming floor while the buffer holds < 5 s
STREAM_DYNAMIC_AFTER_SAMPLES = 5 * SAMPLE_RATE


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    linear = 3.0 * freq / 200.0
    log_part = 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * 27.0 / math.log(6.4)
    return np.where(freq >= 1000.0, log_part, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    linear = 200.0 * mel / 3.0
    log_part = 1000.0 * np.exp(math.log(6.4) / 27.0 * (mel - 15.0))
    return np.where(mel >= 15.0, log_part, linear)


def _mel_filters_np(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_edges = np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(sample_rate / 2)), n_mels + 2)
    edges = _mel_to_hz(mel_edges)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (centre - lower)
    falling = (upper - freqs[None, :]) / (upper - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return (triangles * (2.0 / (upper - lower))).astype(np.float32)


@lru_cache(maxsize=8)
def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                device: torch.device | str | None = None) -> Tensor:
    """Slaney mel filterbank [n_mels, n_fft // 2 + 1], float32 (each triangle normalised to unit area).

    Cached per device; callers must not modify it in place."""
    return torch.from_numpy(_mel_filters_np(n_mels, n_fft, sample_rate)).to(device)


def frames_log_mel(padded: Tensor) -> Tensor:
    """log10 mel power [80, 1 + (len - 400) // 160] of uncentred frames padded[160·i : 160·i + 400]."""
    window = torch.hann_window(N_FFT, device=padded.device)
    stft = torch.stft(padded, N_FFT, HOP, window=window, center=False, return_complex=True)
    mel = mel_filters(device=padded.device) @ (stft.abs() ** 2)
    return torch.clamp(mel, min=LOG_POWER_MIN).log10()


def reflect_pad(samples: Tensor, left: int, right: int) -> Tensor:
    return F.pad(samples[None, None], (left, right), mode="reflect")[0, 0]


def log_mel_power(samples: Tensor) -> Tensor:
    """log10 mel power [80, n // 160] of float32 samples [n] (n > 200): centred frames, last one dropped."""
    half = N_FFT // 2
    return frames_log_mel(reflect_pad(samples.float(), half, half))[:, :-1]


def normalise_log_mel(log_mel: Tensor, floor: float | None, maximum: Tensor | None = None) -> Tensor:
    """Apply the floor and Whisper's (x + 4) / 4 scaling. floor None = `maximum - 8`, where maximum
    defaults to the max of log_mel (pass the whole buffer's max when normalising a slice of it)."""
    if floor is None:
        threshold = (log_mel.max() if maximum is None else maximum) - DYNAMIC_RANGE
    else:
        threshold = torch.tensor(floor, device=log_mel.device)
    return (torch.maximum(log_mel, threshold) + 4.0) / 4.0


def as_float_tensor(samples: np.ndarray | Tensor, device: torch.device | str | None = None) -> Tensor:
    """Audio samples as a float32 tensor on `device`."""
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return samples.to(device=device, dtype=torch.float32)


def log_mel_spectrogram(samples: np.ndarray | Tensor, floor: float | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """Offline log-mel features [80, n // 160] (float32); floor None = Whisper's `max - 8`."""
    return normalise_log_mel(log_mel_power(as_float_tensor(samples, device)), floor)


class StreamingLogMel:
    """Per-session streaming mel: push samples, then take one unit of frames at a time.

    `next_unit()` returns [80, core + context] frames for the next `unit_frames` core frames, or None
    while they (and their right context) are not yet stable. Frame indices are global (counted from the
    first sample ever pushed); `buffer_start_frame` is the global index of the buffer's first frame.
    """

    def __init__(self, unit_frames: int = 100, context_frames: int = 2, slide_trigger_s: float = 30.0,
                 slide_stride_s: float = 10.0, device: torch.device | str | None = None) -> None:
        self.unit_frames = unit_frames
        self.context_frames = context_frames
        self.slide_trigger_samples = int(slide_trigger_s * SAMPLE_RATE)
        self.slide_stride_frames = int(slide_stride_s * SAMPLE_RATE) // HOP
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.buffer = torch.zeros(0, dtype=torch.float32, device=self.device)
        self.stable_log_mel = torch.zeros(N_MELS, 0, device=self.device)  # pre-floor, buffer frames [0, K)
        self.buffer_start_frame = 0
        self.next_core_frame = 0
        self.slides = 0

    def push(self, samples: np.ndarray | Tensor) -> None:
        """Append float32 samples; slide the buffer by 10 s once it holds 30 s.

        The slide waits while it would drop frames (or left context) that no unit has emitted yet.
        """
        self.buffer = torch.cat([self.buffer, as_float_tensor(samples, self.buffer.device)])
        emitted_in_buffer = self.next_core_frame - self.context_frames - self.buffer_start_frame
        if self.buffer.numel() >= self.slide_trigger_samples and emitted_in_buffer >= self.slide_stride_frames:
            self._slide()

    def _slide(self) -> None:
        drop = self.slide_stride_frames
        self.buffer = self.buffer[drop * HOP:]
        self.buffer_start_frame += drop
        self.slides += 1
        self.stable_log_mel = self.stable_log_mel[:, drop:].clone()
        if self.stable_log_mel.shape[1] >= 2:  # frames 0 and 1 reach before the new start: reflect padding
            head = self.buffer[:N_FFT + 2 * HOP]
            self.stable_log_mel[:, :2] = log_mel_power(head)[:, :2]

    def _stable_count(self) -> int:
        """Buffer frames whose window ends inside the buffer."""
        length = self.buffer.numel()
        return min(length // HOP, max(0, (length - N_FFT // 2) // HOP + 1))

    def stable_frames_end(self) -> int:
        """Global index one past the last stable frame."""
        return self.buffer_start_frame + self._stable_count()

    def buffer_log_mel(self) -> Tensor:
        """Pre-floor log-mel of every buffer frame [80, n // 160]; caches the stable ones."""
        known = self.stable_log_mel.shape[1]
        if known < 2:  # frames 0 and 1 see the left reflect padding: transform the whole buffer
            full = log_mel_power(self.buffer)
        else:
            half = N_FFT // 2
            tail = reflect_pad(self.buffer[known * HOP - half:], 0, half)
            new_frames = self.buffer.numel() // HOP - known
            full = torch.cat([self.stable_log_mel, frames_log_mel(tail)[:, :new_frames]], dim=1)
        self.stable_log_mel = full[:, :self._stable_count()]
        return full

    def next_unit(self) -> Tensor | None:
        core_start = self.next_core_frame
        core_end = core_start + self.unit_frames
        if self.stable_frames_end() < core_end + self.context_frames:
            return None
        log_mel = self.buffer_log_mel()
        floor = STREAM_FIXED_FLOOR if self.buffer.numel() < STREAM_DYNAMIC_AFTER_SAMPLES else None
        start = max(0, core_start - self.context_frames) - self.buffer_start_frame
        end = core_end + self.context_frames - self.buffer_start_frame
        self.next_core_frame = core_end
        return normalise_log_mel(log_mel[:, start:end], floor, log_mel.max())
