"""HiFT vocoder of the built-in token2wav (MODEL.md §7): 80-bin mel at 50 frames/s -> 24 kHz waveform.

F0 predictor (convolutions on the mel) -> harmonic-plus-noise source (sines at F0 and its harmonics where
voiced, noise everywhere) -> HiFi-GAN upsampling by `upsample_rates` with Snake residual blocks, the
source's STFT fused in at every stage -> log-magnitude/phase head -> inverse STFT (n_fft 16, hop 4):
8 * 5 * 3 * 4 = 480 samples per mel frame.

The vocoder is non-causal and keeps no state itself: streaming continuity (a re-synthesised tail, the
cached source of that tail, a running sine phase) belongs to the caller, `Token2Wav.synthesize_chunk`.
STFT and inverse STFT are convolutions with fixed DFT bases (fixed shapes, no FFT plans).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.model.presets import Token2WavArgs

HARMONICS = 8  # overtones above F0: HARMONICS + 1 sine waves
SINE_AMPLITUDE = 0.1
VOICED_NOISE_STD = 0.003
UNVOICED_NOISE_STD = SINE_AMPLITUDE / 3
VOICED_THRESHOLD_HZ = 10.0
NOISE_SAMPLES = 65536  # fixed excitation noise, indexed by sample position
RESBLOCK_KERNELS = (3, 7, 11)
RESBLOCK_DILATIONS = (1, 3, 5)
F0_PREDICTOR_LAYERS = 5
LEAKY_SLOPE = 0.1
MAX_MAGNITUDE = 100.0
AUDIO_LIMIT = 0.99


class Snake(nn.Module):
    """x + sin^2(alpha * x) / alpha with a learned per-channel alpha (a periodic bias for waveforms)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]
        return torch.addcmul(x, torch.sin(alpha * x).square(), torch.reciprocal(alpha + 1e-9))


class ResBlock(nn.Module):
    """HiFi-GAN residual block: per dilation, Snake -> dilated conv -> Snake -> conv, added back."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.dilated = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2)
            for d in RESBLOCK_DILATIONS)
        self.plain = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in RESBLOCK_DILATIONS)
        self.dilated_acts = nn.ModuleList(Snake(channels) for _ in RESBLOCK_DILATIONS)
        self.plain_acts = nn.ModuleList(Snake(channels) for _ in RESBLOCK_DILATIONS)

    def forward(self, x: Tensor) -> Tensor:
        for dilated, plain, dilated_act, plain_act in zip(self.dilated, self.plain, self.dilated_acts,
                                                          self.plain_acts):
            x = x + plain(plain_act(dilated(dilated_act(x))))
        return x


class F0Predictor(nn.Module):
    """Mel [B, n_mels, F] -> F0 in Hz [B, F] (conv stack, linear, absolute value)."""

    def __init__(self, n_mels: int, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(F0_PREDICTOR_LAYERS):
            layers += [nn.Conv1d(n_mels if index == 0 else channels, channels, 3, padding=1), nn.ELU()]
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: Tensor) -> Tensor:
        return self.classifier(self.convs(mel).transpose(1, 2)).squeeze(-1).abs()


def dft_bases(n_fft: int) -> tuple[Tensor, Tensor, Tensor]:
    """(analysis, synthesis) conv weights [n_fft + 2, 1, n_fft] for a Hann-windowed real STFT laid out as
    [real bins; imaginary bins], and the squared window [1, 1, n_fft] for overlap-add normalisation."""
    cpu64 = {"dtype": torch.float64, "device": "cpu"}  # exact bases, whatever the default device is
    window = torch.hann_window(n_fft, periodic=True, **cpu64)
    angle = 2 * math.pi * torch.outer(torch.arange(n_fft // 2 + 1, **cpu64), torch.arange(n_fft, **cpu64)) / n_fft
    analysis = torch.cat([angle.cos(), -angle.sin()]) * window
    bin_weight = torch.full((n_fft // 2 + 1, 1), 2.0 / n_fft, **cpu64)
    bin_weight[0], bin_weight[-1] = 1.0 / n_fft, 1.0 / n_fft  # DC and Nyquist appear once in a real signal
    synthesis = torch.cat([angle.cos() * bin_weight, -angle.sin() * bin_weight]) * window
    return analysis[:, None].float(), synthesis[:, None].float(), window.pow(2)[None, None].float()


class HiFTVocoder(nn.Module):
    """Mel frames -> waveform, excited by a harmonic-plus-noise source built from predicted F0."""

    def __init__(self, args: Token2WavArgs) -> None:
        super().__init__()
        channels, rates = args.vocoder_channels, args.upsample_rates
        self.n_fft, self.hop = args.istft_n_fft, args.istft_hop
        self.sample_rate = args.sample_rate
        self.frame_samples = math.prod(rates) * args.istft_hop
        spec_channels = self.n_fft + 2
        self.f0_predictor = F0Predictor(args.n_mels, channels)
        self.source_merge = nn.Linear(HARMONICS + 1, 1)
        self.conv_pre = nn.Conv1d(args.n_mels, channels, 7, padding=3)
        self.ups = nn.ModuleList()
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for stage, rate in enumerate(rates):
            stage_channels = channels >> (stage + 1)
            kernel = 2 * rate + rate % 2
            self.ups.append(nn.ConvTranspose1d(channels >> stage, stage_channels, kernel, rate,
                                               padding=(kernel - rate) // 2))
            # the source spectrum runs at the final frame rate: bring it down to this stage's rate
            down = math.prod(rates[stage + 1:])
            self.source_downs.append(
                nn.Conv1d(spec_channels, stage_channels, 2 * down, down, padding=down // 2) if down > 1
                else nn.Conv1d(spec_channels, stage_channels, 1))
            self.source_resblocks.append(ResBlock(stage_channels, 11 if stage == len(rates) - 1 else 7))
            self.resblocks.extend(ResBlock(stage_channels, kernel) for kernel in RESBLOCK_KERNELS)
        self.conv_post = nn.Conv1d(channels >> len(rates), spec_channels, 7, padding=3)
        analysis, synthesis, window_squared = dft_bases(self.n_fft)
        device = self.conv_pre.weight.device
        self.register_buffer("stft_analysis", analysis.to(device))
        self.register_buffer("stft_synthesis", synthesis.to(device))
        self.register_buffer("window_squared", window_squared.to(device))
        self.register_buffer("noise", torch.randn(HARMONICS + 1, NOISE_SAMPLES))

    def stft(self, signal: Tensor) -> Tensor:
        """Centred STFT [B, n_fft + 2, S / hop + 1] of signal [B, 1, S] (reflect padding, like torch.stft)."""
        padded = F.pad(signal, (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        return F.conv1d(padded, self.stft_analysis, stride=self.hop)

    def istft(self, spec: Tensor) -> Tensor:
        """Inverse of `stft`: [B, n_fft + 2, frames] -> [B, (frames - 1) * hop] (like torch.istft)."""
        frames = spec.size(-1)
        overlapped = F.conv_transpose1d(spec, self.stft_synthesis, stride=self.hop)
        envelope = F.conv_transpose1d(self.window_squared.new_ones(1, 1, frames), self.window_squared,
                                      stride=self.hop)
        start, length = self.n_fft // 2, (frames - 1) * self.hop
        return (overlapped[:, 0, start:start + length] / envelope[:, 0, start:start + length])

    def excitation(self, f0: Tensor, phase0: Tensor, first_sample: Tensor) -> tuple[Tensor, Tensor]:
        """Sines at F0 * (1..HARMONICS+1) plus noise, per sample.

        f0 [B, F] Hz; phase0 [B, HARMONICS + 1] in cycles before the first sample (fp32); the noise is
        read at absolute sample positions from `first_sample`. Returns (excitation [B, S, HARMONICS + 1],
        phase in cycles [B, HARMONICS + 1, S], fp32).
        """
        f0_samples = f0.float().repeat_interleave(self.frame_samples, dim=1)
        harmonics = torch.arange(1, HARMONICS + 2, device=f0.device, dtype=torch.float32)
        cycles = phase0[..., None] + torch.cumsum(
            f0_samples[:, None, :] * harmonics[None, :, None] / self.sample_rate, dim=-1)
        phase = cycles - torch.floor(cycles)
        voiced = (f0_samples > VOICED_THRESHOLD_HZ)[:, None, :]
        noise_index = torch.remainder(first_sample + torch.arange(f0_samples.size(1), device=f0.device),
                                      NOISE_SAMPLES)
        noise = self.noise.index_select(1, noise_index).float()[None]
        sines = torch.where(voiced, SINE_AMPLITUDE * torch.sin(2 * math.pi * phase), 0.0)
        noise_std = torch.where(voiced, VOICED_NOISE_STD, UNVOICED_NOISE_STD)
        return (sines + noise_std * noise).transpose(1, 2), phase

    def forward(self, mel: Tensor, head_source: Tensor, head_valid: Tensor, phase0: Tensor,
                first_sample: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """mel [B, n_mels, F] -> (speech [B, F * 480], source [B, 1, F * 480], sine phase [B, H + 1, F * 480]).

        Where `head_valid`, the first samples of the source are replaced by `head_source` [B, 1, S_head]
        (the source already used for this stretch of audio), so the excitation does not jump.
        """
        excitation, phase = self.excitation(self.f0_predictor(mel), phase0, first_sample)
        source = torch.tanh(self.source_merge(excitation.to(mel.dtype))).transpose(1, 2)
        samples = source.size(-1)
        from_cache = (torch.arange(samples, device=mel.device) < head_source.size(-1)) & head_valid
        source = torch.where(from_cache, F.pad(head_source, (0, samples - head_source.size(-1))), source)
        source_spec = self.stft(source)
        x = self.conv_pre(mel)
        per_stage = len(RESBLOCK_KERNELS)
        for stage, (up, down, source_block) in enumerate(zip(self.ups, self.source_downs, self.source_resblocks)):
            x = up(F.leaky_relu(x, LEAKY_SLOPE))
            if stage == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # one more frame: the centred iSTFT needs S / hop + 1
            x = x + source_block(down(source_spec))
            blocks = self.resblocks[stage * per_stage:(stage + 1) * per_stage]
            x = sum(block(x) for block in blocks) / per_stage
        spec = self.conv_post(F.leaky_relu(x))
        bins = spec.size(1) // 2
        magnitude = torch.exp(spec[:, :bins]).clamp(max=MAX_MAGNITUDE)
        angle = torch.sin(spec[:, bins:])
        speech = self.istft(torch.cat([magnitude * torch.cos(angle), magnitude * torch.sin(angle)], dim=1))
        return speech.clamp(-AUDIO_LIMIT, AUDIO_LIMIT), source, phase
