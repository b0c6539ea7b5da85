"""Built-in token2wav (workers/model/token2wav*.py): rates, the MODEL.md §4 buffer rule, fixed shapes,
determinism, per-session state and turn resets, on the tiny preset (CPU, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.model.presets import FULL, TINY
from workers.model.token2wav import Token2Wav, Token2WavState

SAMPLES_PER_CODE = 960  # 2 mel frames x 480 samples at 24 kHz
WINDOW = TINY.token2wav.chunk_codes + TINY.token2wav.lookahead


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny vocoder is many small ops: one intra-op thread is fastest, and spinning OpenMP workers
    make a second thread very slow on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(seed: int = 0, **kwargs) -> Token2Wav:
    torch.manual_seed(seed)
    return Token2Wav(TINY.token2wav, **kwargs)


@pytest.fixture(scope="module")
def model() -> Token2Wav:
    return build()


@pytest.fixture(scope="module")
def voice_clip() -> np.ndarray:
    t = np.arange(3 * 16000) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def codes(count: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, TINY.token2wav.num_codes, count).tolist()


def test_full_preset_sizes_match_model_md() -> None:
    counts = Token2Wav(FULL.token2wav, device="meta").parameter_counts()
    assert 30e6 < counts["flow_encoder"] < 60e6  # ~10 conformer layers, d 512
    assert 150e6 < counts["flow_estimator"] < 300e6  # ~16 DiT blocks, d 1024
    assert 15e6 < counts["vocoder"] < 25e6  # ~20 M HiFT
    assert counts["total"] == counts["speaker_encoder"] + counts["flow"] + counts["vocoder"]


def test_buffer_rule_and_output_rate(model: Token2Wav) -> None:
    stream = model.new_stream(None)
    sequence = codes(50)
    first, second = stream.push(sequence[:25]), stream.push(sequence[25:])
    last = stream.flush()
    # 3 silence + 25 codes: 25 final codes, minus the 8 held-back vocoder frames (first chunk of a turn)
    assert len(first) == 25 * SAMPLES_PER_CODE - 8 * 480 == 20160
    assert len(second) == 25 * SAMPLES_PER_CODE == 24000  # steady state: 25 codes -> 1 s at 24 kHz
    assert len(last) == 3 * SAMPLES_PER_CODE + 8 * 480 == 6720  # look-ahead codes + held-back tail
    assert len(first) + len(second) + len(last) == (3 + 50) * SAMPLES_PER_CODE
    for pcm in (first, second, last):
        assert pcm.dtype == np.float32 and np.isfinite(pcm).all()
        assert np.abs(pcm).max() <= 1.0 and np.abs(pcm).max() > 0
        np.testing.assert_array_equal(pcm * 32768, np.round(pcm * 32768))  # int16 steps


def test_small_pushes_wait_for_lookahead_plus_five(model: Token2Wav) -> None:
    stream = model.new_stream(None)
    assert len(stream.push(codes(4))) == 0  # 3 silence + 4 < 8
    assert len(stream.push([])) == 0
    # 8 buffered: 5 final codes = 10 frames, minus the 8 held back
    assert len(stream.push(codes(1, seed=2))) == 2 * 480
    assert len(stream.flush()) == 3 * SAMPLES_PER_CODE + 8 * 480


def test_flush_without_codes_is_empty(model: Token2Wav) -> None:
    stream = model.new_stream(None)
    assert len(stream.flush()) == 0
    assert len(stream.push(codes(25))) == 20160  # the stream is still at a turn start


def test_any_chunking_gives_the_same_total_length(model: Token2Wav) -> None:
    sequence = codes(60)
    totals = []
    for pieces in ([60], [7, 13, 25, 15], [1] * 12 + [48]):
        stream = model.new_stream(None)
        audio, start = [], 0
        for size in pieces:
            audio.append(stream.push(sequence[start:start + size]))
            start += size
        audio.append(stream.flush())
        joined = np.concatenate(audio)
        assert np.isfinite(joined).all()
        totals.append(len(joined))
    assert totals == [(3 + 60) * SAMPLES_PER_CODE] * 3


class ShapeRecordingToken2Wav(Token2Wav):
    """Records the shapes of every `synthesize_chunk` call (inputs, state, output)."""

    calls: list[tuple]

    def synthesize_chunk(self, state: Token2WavState, codes: torch.Tensor, valid_codes: torch.Tensor,
                         emit_codes: torch.Tensor) -> torch.Tensor:
        before = tuple((name, t.shape) for name, t in {**state.session, **state.turn}.items())
        pcm = super().synthesize_chunk(state, codes, valid_codes, emit_codes)
        after = tuple((name, t.shape) for name, t in {**state.session, **state.turn}.items())
        self.calls.append((tuple(codes.shape), valid_codes.shape, emit_codes.shape, before, after, pcm.shape))
        return pcm


def test_every_synthesis_call_has_the_same_shapes() -> None:
    torch.manual_seed(0)
    model = ShapeRecordingToken2Wav(TINY.token2wav)
    model.calls = []
    stream = model.new_stream(None)
    for size in (4, 1, 25, 40, 9, 2):
        stream.push(codes(size, seed=size))
    stream.flush()
    stream.push(codes(3))
    stream.flush()
    assert len(model.calls) == 7  # pushes: 0, 1, 1, 2 (28 + 18 codes), 1, 0; flush 1; push 0; flush 1
    assert len(set(model.calls)) == 1  # identical shapes for every call, full or partial, last or not
    code_shape, valid_shape, emit_shape, before, after, pcm_shape = model.calls[0]
    assert code_shape == (1, WINDOW) and valid_shape == emit_shape == torch.Size([])
    assert before == after
    assert pcm_shape == ((8 + 2 * TINY.token2wav.chunk_codes) * 480,)


def test_same_seed_same_audio_other_seed_differs(voice_clip: np.ndarray) -> None:
    outputs = []
    for seed in (0, 0, 1):
        stream = build(seed).new_stream(voice_clip)
        outputs.append(np.concatenate([stream.push(codes(40)), stream.flush()]))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])


def test_reset_turn_restores_the_turn_start_state(model: Token2Wav, voice_clip: np.ndarray) -> None:
    fresh = model.new_stream(voice_clip)
    expected = np.concatenate([fresh.push(codes(30, seed=5)), fresh.flush()])

    stream = model.new_stream(voice_clip)
    stream.push(codes(60, seed=4))
    stream.flush()  # end of turn: caches back to the turn start
    after_flush = np.concatenate([stream.push(codes(30, seed=5)), stream.flush()])
    np.testing.assert_array_equal(after_flush, expected)

    stream.push(codes(20, seed=6))
    stream.reset_turn()  # abandoned turn (e.g. barge-in)
    after_reset = np.concatenate([stream.push(codes(30, seed=5)), stream.flush()])
    np.testing.assert_array_equal(after_reset, expected)


def test_sessions_share_weights_but_not_state(model: Token2Wav, voice_clip: np.ndarray) -> None:
    solo = model.new_stream(voice_clip)
    expected = [solo.push(codes(25, seed=7)), solo.push(codes(25, seed=8)), solo.flush()]
    first, second = model.new_stream(voice_clip), model.new_stream(None)
    interleaved = []
    for chunk_seed in (7, 8):
        interleaved.append(first.push(codes(25, seed=chunk_seed)))
        second.push(codes(25, seed=chunk_seed + 10))
    interleaved.append(first.flush())
    for got, want in zip(interleaved, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_voice_clip_conditions_the_audio(model: Token2Wav, voice_clip: np.ndarray) -> None:
    with_clip, without = model.new_stream(voice_clip), model.new_stream(None)
    assert int(with_clip.state.session["prompt_valid"].sum()) == model.prompt_frames  # 3 s clip, 150 frames
    assert int(without.state.session["prompt_valid"].sum()) == 0
    short = model.new_stream(voice_clip[:16000])
    assert int(short.state.session["prompt_valid"].sum()) == 51  # 1 s at 50 frames/s, centred frames
    sequence = codes(25)
    assert not np.array_equal(with_clip.push(sequence), without.push(sequence))


def test_dft_basis_stft_matches_torch(model: Token2Wav) -> None:
    vocoder = model.hift
    signal = torch.randn(1, 1, 4800)
    spec = vocoder.stft(signal)
    reference = torch.stft(signal[0], vocoder.n_fft, vocoder.hop, window=torch.hann_window(vocoder.n_fft),
                           center=True, return_complex=True)
    bins = vocoder.n_fft // 2 + 1
    torch.testing.assert_close(spec[0, :bins], reference[0].real, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(spec[0, bins:], reference[0].imag, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vocoder.istft(spec), signal[:, 0], atol=1e-4, rtol=1e-4)


def test_rejects_codes_outside_the_codebook(model: Token2Wav) -> None:
    stream = model.new_stream(None)
    with pytest.raises(ValueError):
        stream.push([TINY.token2wav.num_codes])  # the TTS end-of-speech id is not a speech code
    with pytest.raises(ValueError):
        stream.push([-1])


def test_bfloat16_runs_and_stays_finite() -> None:
    stream = build(dtype=torch.bfloat16).new_stream(None)
    pcm = np.concatenate([stream.push(codes(25)), stream.flush()])
    assert len(pcm) == (3 + 25) * SAMPLES_PER_CODE and np.isfinite(pcm).all()
