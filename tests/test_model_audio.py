"""Audio path: log-mel (offline and streaming), Whisper encoder, projection and the streaming encoder (tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from workers.model.apm import (
    FIRST_UNIT_SAMPLES,
    UNIT_SAMPLES,
    AudioProjection,
    StreamingAudioEncoder,
    WhisperEncoder,
    build_audio_pooler,
)
from workers.model.mel import (
    StreamingLogMel,
    _hz_to_mel,
    log_mel_power,
    log_mel_spectrogram,
    mel_filters,
)
from workers.model.presets import FULL, TINY, AudioArgs


class AudioTower(nn.Module):
    """The three audio attributes of OmniModel, built alone."""

    def __init__(self, args: AudioArgs) -> None:
        super().__init__()
        self.apm = WhisperEncoder(args)
        self.audio_projection_layer = AudioProjection(args)
        self.audio_avg_pooler = build_audio_pooler(args)


@pytest.fixture(scope="module")
def tower() -> AudioTower:
    torch.manual_seed(0)
    model = AudioTower(TINY.audio)
    model.apm.init_weights()
    model.audio_projection_layer.init_weights()
    return model.eval()


def speech_like(seconds: float, seed: int = 0, silences: tuple[tuple[float, float], ...] = ()) -> np.ndarray:
    """Noise plus a gliding tone, with stretches of exact silence (start s, end s)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    audio = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (200 + 100 * t) * t)
    for start, end in silences:
        audio[int(start * 16000):int(end * 16000)] = 0.0
    return audio.astype(np.float32)


def units_samples(units: int) -> int:
    return FIRST_UNIT_SAMPLES + UNIT_SAMPLES * (units - 1)


# ---------------------------------------------------------------- mel


def test_mel_filterbank_is_slaney() -> None:
    filters = mel_filters()
    assert filters.shape == (80, 201) and (filters >= 0).all()
    assert abs(float(_hz_to_mel(np.array(1000.0))) - 15.0) < 1e-9  # linear/log junction of the Slaney scale
    peaks = filters.argmax(dim=1)
    assert (peaks[1:] >= peaks[:-1]).all() and peaks[-1] > 190
    bin_hz = 8000 / 200
    areas = filters.sum(dim=1)[30:] * bin_hz  # area normalisation: each triangle integrates to ~1 over Hz
    assert abs(areas.mean() - 1) < 0.01 and (areas - 1).abs().max() < 0.1
    # first triangle by hand: edges 0, s, 2s Hz with s = mel_to_hz(45.245 / 81) = 37.24 Hz, height 2 / (2s)
    step_hz = 200 / 3 * (15 + 27 * np.log(8) / np.log(6.4)) / 81
    falling_edge = (2 * step_hz - 40) / step_hz  # 40 Hz (bin 1) lies on the falling side
    assert abs(filters[0, 1] - falling_edge * 2 / (2 * step_hz)) < 1e-6
    assert filters[0, 2] == 0


def numpy_log_mel(audio: np.ndarray, floor: float | None) -> np.ndarray:
    """Independent definition: centred frames (reflect pad 200), periodic Hann, rfft, drop the last frame."""
    padded = np.pad(audio.astype(np.float64), 200, mode="reflect")
    frames = audio.size // 160
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    segments = np.stack([padded[160 * f:160 * f + 400] * window for f in range(frames)])
    power = np.abs(np.fft.rfft(segments, axis=1)) ** 2  # [frames, 201]
    log_mel = np.log10(np.maximum(mel_filters().double().numpy() @ power.T, 1e-10))
    threshold = log_mel.max() - 8.0 if floor is None else floor
    return (np.maximum(log_mel, threshold) + 4.0) / 4.0


@pytest.mark.parametrize("floor", [None, -10.0])
def test_log_mel_matches_numpy_stft(floor: float | None) -> None:
    audio = speech_like(1.3, silences=((0.5, 0.8),))
    ours = log_mel_spectrogram(audio, floor=floor)
    assert ours.shape == (80, audio.size // 160) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - numpy_log_mel(audio, floor)).max() < 2e-4


def test_streaming_mel_equals_offline_while_floor_is_fixed() -> None:
    audio = speech_like(4.2)
    stream = StreamingLogMel()
    offline = log_mel_spectrogram(audio[:units_samples(4)], floor=-10.0)  # < 5 s: floor -10 throughout
    pushed = 0
    for unit in range(4):
        size = FIRST_UNIT_SAMPLES if unit == 0 else UNIT_SAMPLES
        stream.push(audio[pushed:pushed + size])
        pushed += size
        frames = stream.next_unit()
        start = max(0, 100 * unit - 2)
        assert frames.shape == (80, 100 * unit + 102 - start)
        assert torch.allclose(frames, offline[:, start:100 * unit + 102], atol=1e-5)
        assert stream.next_unit() is None  # the next unit's frames are not stable yet


def test_streaming_mel_dynamic_floor_and_slide() -> None:
    audio = speech_like(32.5, silences=((4.2, 4.6), (30.2, 30.5)))
    stream = StreamingLogMel()
    pushed = 0
    for unit in range(31):
        size = FIRST_UNIT_SAMPLES if unit == 0 else UNIT_SAMPLES
        stream.push(audio[pushed:pushed + size])
        pushed += size
        frames = stream.next_unit()
        if unit in (4, 30):  # buffer >= 5 s: floor is max - 8 over the buffer (the silence shows it)
            buffer_start = stream.buffer_start_frame * 160
            expected = log_mel_spectrogram(audio[buffer_start:pushed], floor=None)
            local = 100 * unit - 2 - stream.buffer_start_frame
            assert torch.allclose(frames, expected[:, local:local + 104], atol=1e-5)
            fixed = log_mel_spectrogram(audio[buffer_start:pushed], floor=-10.0)
            assert not torch.allclose(frames, fixed[:, local:local + 104], atol=1e-2)
    assert stream.slides == 1 and stream.buffer_start_frame == 1000
    assert torch.allclose(stream.buffer_log_mel(), log_mel_power(stream.buffer), atol=1e-4)  # cache is exact
    assert stream.buffer.numel() == pushed - 160_000


# ---------------------------------------------------------------- encoder modules


def test_apm_and_projection_checkpoint_names(tower: AudioTower) -> None:
    shapes = {name: tuple(p.shape) for name, p in tower.state_dict().items()}
    d, ffn = TINY.audio.d_model, TINY.audio.ffn
    assert shapes["apm.conv1.weight"] == (d, 80, 3) and shapes["apm.conv1.bias"] == (d,)
    assert shapes["apm.conv2.weight"] == (d, d, 3) and shapes["apm.conv2.bias"] == (d,)
    assert shapes["apm.embed_positions.weight"] == (1500, d)
    for proj in ("q_proj", "v_proj", "out_proj"):
        assert shapes[f"apm.layers.1.self_attn.{proj}.weight"] == (d, d)
        assert shapes[f"apm.layers.1.self_attn.{proj}.bias"] == (d,)
    assert shapes["apm.layers.1.self_attn.k_proj.weight"] == (d, d)
    assert "apm.layers.1.self_attn.k_proj.bias" not in shapes
    assert shapes["apm.layers.0.fc1.weight"] == (ffn, d) and shapes["apm.layers.0.fc2.weight"] == (d, ffn)
    for norm in ("apm.layers.0.self_attn_layer_norm", "apm.layers.0.final_layer_norm", "apm.layer_norm"):
        assert shapes[f"{norm}.weight"] == shapes[f"{norm}.bias"] == (d,)
    assert shapes["audio_projection_layer.linear1.weight"] == (TINY.audio.projection_hidden, ffn // 4)
    assert shapes["audio_projection_layer.linear2.weight"] == (TINY.audio.llm_hidden, TINY.audio.projection_hidden)
    assert shapes["audio_projection_layer.linear2.bias"] == (TINY.audio.llm_hidden,)
    assert not any(name.startswith("audio_avg_pooler") for name in shapes)


def test_full_size_parameter_counts_on_meta() -> None:
    with torch.device("meta"):
        full = AudioTower(FULL.audio)
    apm_params = sum(p.numel() for p in full.apm.parameters())
    assert abs(apm_params / 0.31e9 - 1) < 0.02
    assert tuple(full.audio_projection_layer.linear1.weight.shape) == (4096, 1024)
    assert full.apm.conv1.weight.is_meta


# ---------------------------------------------------------------- streaming encoder


def test_ten_tokens_per_second_and_unit_boundaries(tower: AudioTower) -> None:
    encoder = StreamingAudioEncoder(tower)
    audio = speech_like(3.1)
    assert encoder.feed(audio[:16_000]).shape == (0, TINY.audio.llm_hidden)
    assert encoder.unit_samples == FIRST_UNIT_SAMPLES
    assert encoder.feed(audio[16_000:FIRST_UNIT_SAMPLES]).shape == (10, TINY.audio.llm_hidden)
    assert encoder.unit_samples == UNIT_SAMPLES
    assert encoder.feed(audio[FIRST_UNIT_SAMPLES:units_samples(2) - 1]).shape[0] == 0
    assert encoder.feed(audio[units_samples(2) - 1:units_samples(3)]).shape[0] == 20
    assert encoder.cache_length == 150


def test_push_then_encode_one_unit_at_a_time(tower: AudioTower) -> None:
    audio = speech_like(3.1, seed=2)[:units_samples(3) + 100]
    encoder = StreamingAudioEncoder(tower)
    encoder.push(audio[:FIRST_UNIT_SAMPLES - 1])
    assert encoder.ready_units == 0
    with pytest.raises(RuntimeError):
        encoder.encode_next_unit()
    encoder.push(audio[FIRST_UNIT_SAMPLES - 1:])
    assert encoder.ready_units == 3
    one_by_one = torch.cat([encoder.encode_next_unit() for _ in range(3)])
    assert encoder.ready_units == 0 and encoder.pending.size == 100
    assert torch.equal(one_by_one, StreamingAudioEncoder(tower).feed(audio))


def test_streaming_equals_offline_chunk_causal(tower: AudioTower) -> None:
    audio = speech_like(3.2)[:units_samples(3)]
    encoder = StreamingAudioEncoder(tower)
    streamed = torch.cat([encoder.feed(piece) for piece in np.array_split(audio, 7)])  # odd-sized pieces
    assert streamed.shape == (30, TINY.audio.llm_hidden)
    offline = encoder.encode_mel(log_mel_spectrogram(audio, floor=-10.0))  # same floor as the stream (< 5 s)
    assert offline.shape[0] == 30
    assert (streamed - offline).abs().max() < 1e-5
    # the mask matters: full bidirectional attention over the clip gives different tokens
    with torch.inference_mode():
        hidden = tower.apm(tower.apm.embed_mel(log_mel_spectrogram(audio, floor=-10.0)[None]))
        full = tower.audio_avg_pooler(tower.audio_projection_layer(hidden).transpose(1, 2)).transpose(1, 2)[0]
    assert (full[:10] - offline[:10]).abs().max() > 1e-3


def test_reset_replays_identically(tower: AudioTower) -> None:
    audio = speech_like(2.1, seed=3)[:units_samples(2)]
    encoder = StreamingAudioEncoder(tower)
    first = encoder.feed(audio)
    encoder.reset()
    assert encoder.cache_length == 0 and encoder.unit_samples == FIRST_UNIT_SAMPLES
    assert torch.equal(encoder.feed(audio), first)


def test_long_stream_resets_cache_and_slides_buffer(tower: AudioTower) -> None:
    audio = speech_like(31.1, seed=5)
    encoder = StreamingAudioEncoder(tower)
    lengths = []
    tokens = 0
    for unit in range(31):
        start = 0 if unit == 0 else units_samples(unit)
        out = encoder.feed(audio[start:units_samples(unit + 1)])
        assert out.shape == (10, TINY.audio.llm_hidden) and torch.isfinite(out).all()
        tokens += out.shape[0]
        lengths.append(encoder.cache_length)
    assert tokens == 310
    assert lengths[:29] == [50 * (u + 1) for u in range(29)]
    assert lengths[29:] == [50, 100]  # 1450 + 50 would reach 1500 positions: reset at unit 29 (≈ 30 s)
    assert encoder.cache_resets == 1
    assert encoder.mel.slides == 1 and encoder.mel.buffer_start_frame == 1000


def test_encode_offline_reference_voice(tower: AudioTower) -> None:
    encoder = StreamingAudioEncoder(tower)
    out = encoder.encode_offline(speech_like(2.5, seed=7))
    assert out.shape == (25, TINY.audio.llm_hidden) and torch.isfinite(out).all()
    long_clip = encoder.encode_offline(speech_like(31.0, seed=8))  # 30 s segments: positions stay < 1500
    assert long_clip.shape == (310, TINY.audio.llm_hidden)
    assert encoder.cache_length == 0  # the offline path leaves the streaming state alone


def test_bfloat16_streaming(tower: AudioTower) -> None:
    bf16 = AudioTower(TINY.audio)
    bf16.load_state_dict(tower.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    audio = speech_like(2.1, seed=9)[:units_samples(2)]
    out = StreamingAudioEncoder(bf16).feed(audio)
    reference = StreamingAudioEncoder(tower).feed(audio)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    assert (out.float() - reference).abs().mean() < 0.05 * reference.abs().mean() + 1e-3
