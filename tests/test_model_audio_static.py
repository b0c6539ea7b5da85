"""Fixed-shape streaming audio units (`encode_unit`) and the engine's per-slot audio states.

CPU (tiny preset, float32, a 300-position Whisper cache so that a cache reset comes after 5 units): the
streaming tokens equal a reference built from the variable-length definition — each unit's convolutions
over its own mel window (no left context for the first), then the frames since the last cache reset
through the encoder with a chunk-causal mask of 1 s chunks, the unit's last 50 frames taken. Slot
encoders are bit-identical to encoders with their own cache, independent of each other, and a reset or a
take-over restores a fresh encoder's tokens.

GPU (`-m gpu`): the slots' captured graphs against the plain call, nothing captured after the warm-up.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from common.config import ServiceConfig, SessionSettings
from workers.engine.engine import DuplexEngine
from workers.model.apm import (
    FIRST_UNIT_SAMPLES,
    MEL_CONTEXT_FRAMES,
    UNIT_MEL_FRAMES,
    UNIT_SAMPLES,
    AudioProjection,
    StreamingAudioEncoder,
    StreamingAudioSlots,
    WhisperEncoder,
    audio_tokens,
    build_audio_pooler,
    chunk_causal_mask,
)
from workers.model.mel import StreamingLogMel
from workers.model.presets import TINY

MAX_POSITIONS = 300  # units 0-4 fill 250 rows; unit 5 would reach 300, so the cache resets there
UNIT_FRAMES = UNIT_MEL_FRAMES // 2
UNITS = 8

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class AudioTower(nn.Module):
    """The three audio attributes of OmniModel, built alone."""

    def __init__(self, max_positions: int = MAX_POSITIONS) -> None:
        super().__init__()
        args = replace(TINY.audio, max_positions=max_positions)
        self.apm = WhisperEncoder(args)
        self.audio_projection_layer = AudioProjection(args)
        self.audio_avg_pooler = build_audio_pooler(args)


def build_tower(device: str = "cpu") -> AudioTower:
    torch.manual_seed(0)
    tower = AudioTower()
    tower.apm.init_weights()
    tower.audio_projection_layer.init_weights()
    return tower.to(device).eval()


@pytest.fixture(scope="module")
def tower() -> AudioTower:
    return build_tower()


def noise_audio(units: int, seed: int) -> np.ndarray:
    """Samples for exactly `units` units: noise plus a tone, different per seed."""
    rng = np.random.default_rng(seed)
    count = FIRST_UNIT_SAMPLES + UNIT_SAMPLES * (units - 1)
    t = np.arange(count) / 16000
    return (0.05 * rng.standard_normal(count) + 0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t)).astype(np.float32)


def unit_pieces(audio: np.ndarray) -> list[np.ndarray]:
    """The samples of each unit (the first unit's 16 560, then 16 000 each)."""
    bounds = [0, *range(FIRST_UNIT_SAMPLES, audio.size + 1, UNIT_SAMPLES)]
    return [audio[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]


@torch.inference_mode()
def reference_units(tower: AudioTower, audio: np.ndarray) -> list[Tensor]:
    """Tokens [10, llm_hidden] of each unit by the variable-length definition (see the module docstring)."""
    mel = StreamingLogMel(UNIT_MEL_FRAMES, MEL_CONTEXT_FRAMES)
    since_reset: list[Tensor] = []
    tokens = []
    for index, piece in enumerate(unit_pieces(audio)):
        mel.push(piece)
        window = mel.next_unit()
        assert window is not None and window.shape[1] == UNIT_MEL_FRAMES + (1 if index == 0 else 2) * 2
        left = 0 if index == 0 else MEL_CONTEXT_FRAMES // 2
        frames = tower.apm.embed_mel(window[None])[:, left:left + UNIT_FRAMES]
        if UNIT_FRAMES * (len(since_reset) + 1) >= MAX_POSITIONS:
            since_reset = []
        since_reset.append(frames)
        joined = torch.cat(since_reset, dim=1)
        hidden = tower.apm(joined, attn_mask=chunk_causal_mask(joined.shape[1], UNIT_FRAMES))
        tokens.append(audio_tokens(tower, hidden[:, -UNIT_FRAMES:])[0])
    return tokens


def stream_units(encoder: StreamingAudioEncoder, audio: np.ndarray) -> list[Tensor]:
    """Feed `audio` in odd-sized pieces; the tokens of each unit."""
    tokens = torch.cat([encoder.feed(piece) for piece in np.array_split(audio, 11)])
    return list(tokens.split(10))


def test_static_units_equal_the_variable_length_definition_across_a_reset(tower: AudioTower) -> None:
    audio = noise_audio(UNITS, seed=1)
    encoder = StreamingAudioEncoder(tower)
    streamed = stream_units(encoder, audio)
    reference = reference_units(tower, audio)
    assert len(streamed) == len(reference) == UNITS
    for got, want in zip(streamed, reference, strict=True):
        torch.testing.assert_close(got, want)
    assert encoder.cache_resets == 1 and encoder.cache_length == UNIT_FRAMES * (UNITS - 5)
    # the first unit's flag matters: without it conv2 sees conv1's output over the zero frames
    window = first_unit_window(audio)
    padded = torch.nn.functional.pad(window, (MEL_CONTEXT_FRAMES, 0))
    with torch.inference_mode():
        flagged = tower.apm.embed_unit(padded, torch.tensor(True))
        unflagged = tower.apm.embed_unit(padded, torch.tensor(False))
        unpadded = tower.apm.embed_mel(window[None])[:, :UNIT_FRAMES]
    torch.testing.assert_close(flagged, unpadded)
    assert (unflagged[:, 0] - unpadded[:, 0]).abs().max() > 1e-3


def first_unit_window(audio: np.ndarray) -> Tensor:
    """The first unit's mel window [80, 102] (no left context)."""
    mel = StreamingLogMel(UNIT_MEL_FRAMES, MEL_CONTEXT_FRAMES)
    mel.push(audio[:FIRST_UNIT_SAMPLES])
    window = mel.next_unit()
    assert window is not None
    return window


def test_slot_encoders_are_bit_identical_to_own_cache_encoders_and_independent(tower: AudioTower) -> None:
    slots = StreamingAudioSlots(tower, 2)
    slots.warmup()
    assert slots.graph_count == 2 and slots.late_captures == 0
    audios = [noise_audio(UNITS, seed=2), noise_audio(UNITS, seed=3)]
    on_slots = [StreamingAudioEncoder(tower, slots, slot) for slot in (0, 1)]
    assert on_slots[0].cache is slots.caches[0] and on_slots[1].cache is slots.caches[1]
    got: list[list[Tensor]] = [[], []]
    for pieces in zip(*(np.array_split(audio, 9) for audio in audios), strict=True):  # interleaved
        for index, piece in enumerate(pieces):
            got[index].append(on_slots[index].feed(piece))
    for index, audio in enumerate(audios):
        want = StreamingAudioEncoder(tower).feed(audio)
        assert want.shape[0] == 10 * UNITS and torch.equal(torch.cat(got[index]), want)
    # a reset keeps the stale rows but masks them: the replay is bit-identical
    on_slots[0].reset()
    assert on_slots[0].cache_length == 0 and on_slots[0].unit_samples == FIRST_UNIT_SAMPLES
    assert torch.equal(on_slots[0].feed(audios[0]), torch.cat(got[0]))


def test_a_new_encoder_takes_the_slot_over(tower: AudioTower) -> None:
    slots = StreamingAudioSlots(tower, 1)
    audio = noise_audio(3, seed=4)
    old = StreamingAudioEncoder(tower, slots, 0)
    old.feed(audio[:FIRST_UNIT_SAMPLES])
    new = StreamingAudioEncoder(tower, slots, 0)
    assert new.cache_length == 0 and bool((slots.caches[0].keys == 0).all())
    assert torch.equal(new.feed(audio), StreamingAudioEncoder(tower).feed(audio))
    with pytest.raises(RuntimeError, match="took it over"):
        old.feed(audio[FIRST_UNIT_SAMPLES:])
    with pytest.raises(ValueError):
        StreamingAudioEncoder(tower, slots, 1)
    with pytest.raises(ValueError):
        StreamingAudioEncoder(tower, slots)


def test_engine_runs_each_session_audio_on_its_slot() -> None:
    cfg = ServiceConfig.model_validate({"model": {"preset": "tiny", "device": "cpu", "dtype": "float32",
                                                  "acceleration": "eager"},
                                        "service": {"sessions_per_worker": 2}})
    engine = DuplexEngine(cfg)
    engine.warmup()
    assert engine.audio_slots.graph_count == 2 and engine.recompiles_since_warmup() == 0
    sessions = [engine.new_session(f"s{index}") for index in range(2)]
    for session in sessions:
        session.prepare("hello", SessionSettings(), None, None)
        assert session.audio_encoder.cache is engine.audio_slots.caches[session.slot]
    for session in sessions:
        session.close()


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@cuda_only
def test_captured_unit_graphs_equal_the_plain_call_on_cuda() -> None:
    tower = build_tower("cuda")
    slots = StreamingAudioSlots(tower, 2, cuda_graphs=True)
    slots.warmup()
    assert slots.graph_count == 2
    audios = [noise_audio(UNITS, seed=5), noise_audio(UNITS, seed=6)]
    on_slots = [StreamingAudioEncoder(tower, slots, slot) for slot in (0, 1)]
    got = [[encoder.feed(piece) for piece in np.array_split(audio, 9)] for encoder, audio in zip(on_slots, audios,
                                                                                               strict=True)]
    for index, audio in enumerate(audios):
        plain = StreamingAudioEncoder(tower)
        torch.testing.assert_close(torch.cat(got[index]), plain.feed(audio))
        assert on_slots[index].cache_resets == plain.cache_resets == 1
    assert slots.late_captures == 0
