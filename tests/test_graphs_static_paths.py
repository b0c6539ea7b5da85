"""Static-buffer paths behind the CUDA graphs of token2wav and the vision encoder (workers/engine/graphs.py).

CPU: `CapturedCall` without a graph runs the very code a graph replays (the callable on static input
buffers), so these tests pin it to the plain path bit for bit: token2wav streams on engine slots against
streams with their own state (tiny preset, float32, across a turn boundary, a reset and a flush), slot
independence and take-over, per-grid vision calls against the plain encoder, and the engine's wiring.

GPU (`-m gpu`): graph replay against the plain call, capture leaving mutated state untouched, late
captures counted, and a tiny fast-mode session that captures nothing after `engine.warmup()`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from common.config import ServiceConfig, SessionSettings
from workers.compile import WARMUP_MP4
from workers.engine.engine import DuplexEngine
from workers.engine.graphs import CapturedCall, CapturedCalls
from workers.media import load_media
from workers.model.image import common_source_grids, patch_grid, plan_slices, slice_image
from workers.model.omni import OmniModel, build_model
from workers.model.presets import TINY
from workers.model.token2wav import Token2Wav, Token2WavStream

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small ops: one intra-op thread is fastest on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_token2wav(device: str = "cpu") -> Token2Wav:
    torch.manual_seed(0)
    return Token2Wav(TINY.token2wav, device=device)


def codes(count: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, TINY.token2wav.num_codes, count).tolist()


@pytest.fixture(scope="module")
def voice_clip() -> np.ndarray:
    t = np.arange(3 * 16000) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


# Pushes of 25, 25 and 7 codes, a flush (turn boundary), an abandoned turn, then 30 codes and a flush.
TURN_STEPS: list[Callable[[Token2WavStream], np.ndarray | None]] = [
    lambda s: s.push(codes(25, 1)), lambda s: s.push(codes(25, 2)), lambda s: s.push(codes(7, 3)),
    lambda s: s.flush(), lambda s: (s.push(codes(12, 4)), s.reset_turn())[1],
    lambda s: s.push(codes(30, 5)), lambda s: s.flush()]


def two_turns(stream: Token2WavStream) -> list[np.ndarray]:
    """The PCM of TURN_STEPS (the abandoned turn gives none)."""
    return [pcm for step in TURN_STEPS if (pcm := step(stream)) is not None]


def assert_same_pieces(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert [len(piece) for piece in got] == [len(piece) for piece in want]
    for got_piece, want_piece in zip(got, want, strict=True):
        np.testing.assert_array_equal(got_piece, want_piece)


# ------------------------------------------------------------------------------------- CapturedCall, CPU


def test_captured_call_on_cpu_is_the_plain_call_on_static_buffers() -> None:
    weight = torch.randn(8, 8)

    def fn(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x @ weight * scale, x.sum()

    call = CapturedCall(fn, [torch.zeros(2, 8), torch.tensor(1.0)], cuda_graph=False)
    assert not call.captured
    x = torch.randn(2, 8)
    first = call(x, torch.tensor(3.0))
    assert torch.equal(first[0], fn(x, torch.tensor(3.0))[0]) and torch.equal(first[1], x.sum())
    kept = first[0].clone()
    call(torch.randn(2, 8), torch.tensor(5.0))
    assert torch.equal(first[0], kept)  # a later call does not overwrite an earlier result
    with pytest.raises(ValueError, match="shape"):
        call(torch.randn(1, 8), torch.tensor(1.0))  # would broadcast into the static buffer
    with pytest.raises(ValueError, match="inputs"):
        call(x)


def test_captured_calls_count_only_graph_captures() -> None:
    calls = CapturedCalls(cuda_graphs=False)
    calls.add("a", torch.neg, [torch.zeros(3)])
    calls.warm = True
    calls.add("b", torch.neg, [torch.zeros(4)])  # built after the warm-up, but no graph on CPU
    assert len(calls) == 2 and "b" in calls and calls.get("c") is None
    assert calls.late_captures == 0
    assert torch.equal(calls.get("b")(torch.arange(4.0)), -torch.arange(4.0))


# ---------------------------------------------------------------------------------------- token2wav, CPU


def test_slot_stream_is_bit_identical_to_a_plain_stream(voice_clip: np.ndarray) -> None:
    model = build_token2wav()
    expected = two_turns(model.new_stream(voice_clip))
    model.setup_slots(2)
    model.warmup_slots()
    assert model.graph_count == 2 and model.late_captures == 0
    assert model.new_stream(None, slot=1).state is model.new_stream(None, slot=1).state  # one static state
    assert_same_pieces(two_turns(model.new_stream(voice_clip, slot=1)), expected)


def test_slots_are_independent_and_reset_for_each_new_stream(voice_clip: np.ndarray) -> None:
    model = build_token2wav()
    with_voice = two_turns(model.new_stream(voice_clip))
    without_voice = two_turns(model.new_stream(None))
    model.setup_slots(2)  # no warm-up: the calls are built on first use
    first, second = model.new_stream(voice_clip, slot=0), model.new_stream(None, slot=1)
    outputs: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for step in TURN_STEPS:  # interleaved step by step
        for slot, stream in ((0, first), (1, second)):
            if (pcm := step(stream)) is not None:
                outputs[slot].append(pcm)
    assert_same_pieces(outputs[0], with_voice)
    assert_same_pieces(outputs[1], without_voice)
    # slot 0 had a voice and a finished turn: a new stream there starts from the no-voice state
    assert_same_pieces(two_turns(model.new_stream(None, slot=0)), without_voice)


def test_a_stream_taken_over_on_its_slot_refuses_chunks() -> None:
    model = build_token2wav()
    model.setup_slots(1)
    old = model.new_stream(None, slot=0)
    model.new_stream(None, slot=0)
    with pytest.raises(RuntimeError, match="took it over"):
        old.push(codes(25, 1))
    with pytest.raises(ValueError, match="slot 1"):
        model.new_stream(None, slot=1)


# ------------------------------------------------------------------------------------------- vision, CPU


@pytest.fixture(scope="module")
def vision_model() -> OmniModel:
    torch.manual_seed(0)
    return build_model(TINY, "cpu", torch.float32)


def test_captured_vision_on_cpu_equals_the_plain_encoder_per_image(vision_model: OmniModel) -> None:
    big, small, other_big = torch.randn(3, 28, 42), torch.randn(3, 14, 28), torch.randn(3, 28, 42)
    plain = [vision_model.encode_images([image])[0] for image in (big, small, other_big)]
    batched = vision_model.encode_images([big, small, other_big])
    vision_model.use_captured_vision(cuda_graphs=False)
    try:
        vision_model.warmup_vision([(2, 3)])
        captured = vision_model.encode_images([big, small, other_big])
        calls = vision_model.vision_calls
        assert calls is not None and len(calls) == 2 and (1, 2) in calls  # (1, 2) built on first use
        assert calls.late_captures == 0  # nothing is captured on CPU
    finally:
        vision_model.vision_calls = None
    assert captured.shape == batched.shape
    for row, want in enumerate(plain):
        assert torch.equal(captured[row], want)
    torch.testing.assert_close(captured, batched, atol=1e-5, rtol=1e-5)


def test_warmup_mp4_frames_use_a_common_grid() -> None:
    frame = load_media(WARMUP_MP4, max_seconds=1).frame_images(0)[0]
    plan = plan_slices(frame.width, frame.height, 1, TINY.vision)
    assert plan.grid is None
    source = slice_image(frame, 1, TINY.vision)[0]
    assert patch_grid(source, TINY.vision) in common_source_grids(TINY.vision)


# ------------------------------------------------------------------------------------------- engine, CPU


def test_engine_puts_each_session_stream_on_its_slot() -> None:
    cfg = ServiceConfig.model_validate({"model": {"preset": "tiny", "device": "cpu", "dtype": "float32",
                                                  "acceleration": "eager"},
                                        "service": {"sessions_per_worker": 2}})
    engine = DuplexEngine(cfg)
    assert not engine.cuda_graphs and engine.model.vision_calls is None
    engine.warmup()
    assert engine.token2wav.graph_count == 2 and engine.recompiles_since_warmup() == 0
    sessions = [engine.new_session(f"s{index}") for index in range(2)]
    for session in sessions:
        session.prepare("hello", SessionSettings(), None, None)
        assert session.vocoder is not None and session.vocoder.slot == session.slot
    assert {session.slot for session in sessions} == {0, 1}
    for session in sessions:
        session.close()


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@cuda_only
def test_graph_replay_equals_the_plain_call_and_preserves_state() -> None:
    device = torch.device("cuda")
    weight = torch.randn(64, 64, device=device)
    state = torch.zeros(64, device=device)

    def step(x: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(x @ weight + state)
        state.add_(out.mean(dim=0))  # mutated state, as token2wav's turn caches
        return out

    calls = CapturedCalls(cuda_graphs=True)
    call = calls.add("step", step, [torch.randn(4, 64, device=device)], preserve=[state])
    assert call.captured and torch.count_nonzero(state) == 0  # the warm-up runs were undone
    inputs = [torch.randn(4, 64, device=device) for _ in range(3)]
    replayed = [call(x) for x in inputs]
    replayed_state = state.clone()
    state.zero_()
    plain = [step(x) for x in inputs]
    for got, want in zip(replayed, plain, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(replayed_state, state)
    calls.warm = True
    calls.add("other", step, [torch.randn(2, 64, device=device)], preserve=[state])
    assert calls.late_captures == 1


@pytest.mark.gpu
@cuda_only
def test_token2wav_slot_graphs_match_the_plain_stream_on_cuda(voice_clip: np.ndarray) -> None:
    model = build_token2wav("cuda")
    expected = two_turns(model.new_stream(voice_clip))
    model.setup_slots(2, cuda_graphs=True)
    model.warmup_slots()
    assert model.graph_count == 2 and model.late_captures == 0
    first, second = model.new_stream(voice_clip, slot=0), model.new_stream(None, slot=1)
    second.push(codes(40, 9))  # the other slot's graph runs in between
    got = two_turns(first)
    assert [len(piece) for piece in got] == [len(piece) for piece in expected]
    for got_piece, want_piece in zip(got, expected, strict=True):
        np.testing.assert_allclose(got_piece, want_piece, atol=4 / 32768)  # a few int16 steps
    assert model.late_captures == 0


@pytest.mark.gpu
@cuda_only
def test_vision_graphs_match_the_plain_encoder_and_count_late_grids() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, "cuda", torch.bfloat16)
    image = torch.randn(3, 32 * 14, 32 * 14)
    plain = model.encode_images([image])
    model.use_captured_vision()
    model.warmup_vision(common_source_grids(TINY.vision))
    calls = model.vision_calls
    assert calls is not None and len(calls) == 5 and calls.late_captures == 0
    torch.testing.assert_close(model.encode_images([image, image]), torch.cat([plain, plain]),
                               atol=2e-2, rtol=2e-2)
    model.encode_images([torch.randn(3, 14 * 10, 14 * 12)])  # a grid the warm-up did not cover
    assert calls.late_captures == 1


@pytest.mark.gpu
@cuda_only
def test_fast_session_captures_nothing_after_warmup() -> None:
    cfg = ServiceConfig.model_validate({"model": {"preset": "tiny", "device": "cuda", "acceleration": "fast",
                                                  "seed": 7}})
    engine = DuplexEngine(cfg)
    assert engine.cuda_graphs
    engine.warmup()
    clip = load_media(WARMUP_MP4, max_seconds=8)
    session = engine.new_session("graphs", schedule="forced")
    session.prepare("You are a helpful assistant.", SessionSettings(decode_mode="greedy", seed=0), None, None)
    spoken = 0
    for second, samples in enumerate(clip.audio_chunks):
        session.push_audio(samples)
        for _ in range(session.ready_units()):
            result = session.run_unit(clip.frame_images(second))
            session.finalize()
            spoken += 0 if result.is_listen else 1
    session.close()
    assert spoken > 0
    assert engine.token2wav.graph_count == engine.slots
    assert engine.recompiles_since_warmup() == 0
