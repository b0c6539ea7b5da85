"""DuplexSession on the tiny preset (CPU): listen/speak rules, settings isolation, determinism, chunks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.config import ServiceConfig, SessionSettings
from workers.engine.engine import DuplexEngine, NoFreeSlotError
from workers.engine.session import DuplexSession, UnitResult
from workers.model import tokens

SECOND = 16_000


@pytest.fixture(scope="module")
def engine() -> DuplexEngine:
    cfg = ServiceConfig()
    cfg.service.sessions_per_worker = 2
    cfg.duplex.max_kv_tokens = 1024
    return DuplexEngine(cfg, device="cpu")


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SECOND))).astype(np.float32)


def _session(engine: DuplexEngine, schedule: str = "natural", **settings: object) -> DuplexSession:
    session = engine.new_session("test", schedule=schedule)  # type: ignore[arg-type]
    session.prepare("Streaming Omni Conversation.", SessionSettings(seed=5, **settings), None, None)
    return session


def _run(session: DuplexSession, units: int, seed: int = 0, **kwargs: object) -> list[UnitResult]:
    results = []
    for index in range(units):
        session.push_audio(_audio(1.0, seed + index))
        results.append(session.run_unit([], **kwargs))  # type: ignore[arg-type]
        session.finalize()
    return results


def _unit_ids(session: DuplexSession) -> list[list[int]]:
    return [unit.ids for unit in session.ledger.units]


def test_first_units_listen_then_speaking_respects_the_token_and_character_caps(engine: DuplexEngine) -> None:
    # listen_prob_scale 0 removes <|listen|> from the model's choices: after the forced units it speaks
    session = _session(engine, force_listen_count=2, listen_prob_scale=0.0)
    try:
        results = _run(session, 4)
        for result, ids in zip(results[:2], _unit_ids(session)[:2]):
            assert result.is_listen and result.text == "" and result.audio.size == 0 and result.n_tokens == 0
            assert ids == [tokens.LISTEN, tokens.UNIT_END]
        for result, ids in zip(results[2:], _unit_ids(session)[2:]):
            assert not result.is_listen
            assert len(ids) <= 20 + 1  # at most 19 fed tokens + terminator + </unit>
            assert ids[-2] in tokens.UNIT_TERMINATORS and ids[-1] == tokens.UNIT_END
            assert len(result.text) < 28 and result.n_tokens > 0
            assert result.audio.size >= 24_000 and result.n_tts_tokens > 0
        # the byte tokenizer's words are 2-5 characters: the 28-character cap ends these units early
        assert any(len(ids) < 21 and ids[-2] == tokens.CHUNK_EOS for ids in _unit_ids(session)[2:])
        assert session.turn_open
    finally:
        session.close()


def test_barge_in_closes_the_open_turn(engine: DuplexEngine) -> None:
    session = _session(engine, force_listen_count=0, listen_prob_scale=0.0, max_new_speak_tokens_per_chunk=4)
    try:
        spoken = _run(session, 1)[0]
        assert not spoken.is_listen and session.turn_open and session.tts_position > 0
        barge = _run(session, 1, force_listen=True)[0]
        assert barge.is_listen and barge.end_of_turn and barge.audio.size == 0 and barge.text == ""
        assert _unit_ids(session)[-1] == [tokens.TURN_EOS, tokens.LISTEN, tokens.UNIT_END]
        assert not session.turn_open and session.tts_position == 0
        assert _run(session, 1, force_listen=True)[0].end_of_turn is False  # nothing left to close
    finally:
        session.close()


def test_forced_schedule_cycle_and_end_of_turn(engine: DuplexEngine) -> None:
    session = _session(engine, schedule="forced", force_listen_count=0)
    try:
        results = _run(session, 9)
        assert [r.is_listen for r in results] == [True] * 3 + [False] * 5 + [True]
        assert [r.end_of_turn for r in results] == [False] * 7 + [True, False]
        ids = _unit_ids(session)
        for unit_ids in ids[3:8]:
            assert len(unit_ids) == 21 and unit_ids[0] == tokens.SPEAK  # 19 fed + terminator + </unit>
            assert unit_ids[-2] == tokens.CHUNK_EOS
        assert ids[7][-3] == tokens.TURN_EOS
        speak = results[3:8]
        assert all(r.n_tts_tokens == 25 for r in speak)
        assert all(r.n_tokens == 18 for r in speak[:4]) and speak[4].n_tokens == 17
        assert all(len(r.text) >= 28 for r in speak)  # the character cap does not apply
        assert all(r.audio.size >= 24_000 for r in speak[:4])
        assert speak[4].audio.size > 0 and session.tts_position == 0 and not session.turn_open
    finally:
        session.close()


def test_settings_take_effect_and_do_not_leak(engine: DuplexEngine) -> None:
    session = _session(engine, generate_audio=False, force_listen_count=0, listen_prob_scale=0.0,
                       max_new_speak_tokens_per_chunk=3, max_kv_tokens=300, decode_mode="greedy",
                       temperature=0.2, tts_temperature=0.0)
    try:
        assert session.ledger.limits.cap == 300 and session.params.greedy and session.params.temperature == 0.2
        results = _run(session, 2)
        assert all(not r.is_listen for r in results)
        assert all(r.audio.size == 0 and r.n_tts_tokens == 0 for r in results)  # generate_audio=False
        assert all(len(ids) <= 3 + 1 for ids in _unit_ids(session))  # 2 fed + terminator + </unit>
    finally:
        session.close()
    fresh = engine.new_session("next")
    try:
        fresh.prepare("Streaming Omni Conversation.", SessionSettings(), None, None)
        assert fresh.settings == SessionSettings()
        assert fresh.ledger.limits.cap == 1024 and not fresh.params.greedy
        assert fresh.vocoder is not None and fresh.units_run == 0 and not fresh.turn_open
        assert all(r.is_listen for r in _run(fresh, 3))  # default force_listen_count = 3
    finally:
        fresh.close()


def test_same_seed_and_greedy_give_the_same_tokens_and_audio(engine: DuplexEngine) -> None:
    outputs = []
    for _ in range(2):
        session = _session(engine, force_listen_count=1, decode_mode="greedy", listen_prob_scale=0.0,
                           max_new_speak_tokens_per_chunk=6)
        try:
            results = _run(session, 3)
            outputs.append(([r.text for r in results], [r.audio for r in results], _unit_ids(session)))
        finally:
            session.close()
    (texts_a, audio_a, ids_a), (texts_b, audio_b, ids_b) = outputs
    assert texts_a == texts_b and ids_a == ids_b
    assert any(a.size for a in audio_a)
    assert all(np.array_equal(a, b) for a, b in zip(audio_a, audio_b))


def test_short_chunks_buffer_and_long_chunks_make_several_units(engine: DuplexEngine) -> None:
    session = _session(engine)
    try:
        session.push_audio(_audio(0.5))
        assert session.ready_units() == 0
        with pytest.raises(RuntimeError, match="complete unit"):
            session.run_unit([])
        assert session.units_run == 0 and session.position == session.ledger.prefix_length  # no dangling unit
        session.push_audio(_audio(0.5, seed=1))
        assert session.ready_units() == 1
        session.push_audio(_audio(2.5, seed=2))
        assert session.ready_units() == 3
        while session.ready_units():
            session.run_unit([])
        assert session.units_run == 3 and session.ready_units() == 0
        assert session.audio_buffer.size == SECOND // 2
        assert session.audio_encoder.units == 3  # the first unit was padded to 16 560 samples
    finally:
        session.close()


def test_frames_are_wrapped_and_counted(engine: DuplexEngine) -> None:
    session = _session(engine)
    try:
        session.push_audio(_audio(1.0))
        start = session.position
        result = session.run_unit([Image.new("RGB", (1280, 720), (30, 120, 200))], max_slice_nums=2)
        queries = engine.model.args.resampler.queries
        assert result.vision_slices >= 2 and result.vision_tokens == result.vision_slices * queries
        unit_length = 1 + result.vision_slices * (queries + 2) + 10
        assert result.kv_cache_length == start + unit_length
        assert result.timings_ms["vision"] > 0 and result.timings_ms["prefill"] > 0
    finally:
        session.close()


def test_finalize_is_deferred_idempotent_and_awaited_by_the_next_unit(engine: DuplexEngine) -> None:
    session = _session(engine)
    try:
        session.push_audio(_audio(2.0))
        first = session.run_unit([])
        assert session.pending is not None and first.kv_cache_length == session.position
        session.finalize()
        session.finalize()
        assert session.position == first.kv_cache_length + 2 and len(session.ledger.units) == 1
        second = session.run_unit([])  # no explicit finalize in between: run_unit waits for it
        session.finalize()
        assert len(session.ledger.units) == 2 and second.unit_index == 1
    finally:
        session.close()


def test_slots_are_taken_and_returned(engine: DuplexEngine) -> None:
    first, second = engine.new_session("a"), engine.new_session("b")
    assert {first.slot, second.slot} == {0, 1}
    with pytest.raises(NoFreeSlotError):
        engine.new_session("c")
    first.close()
    first.close()
    third = engine.new_session("c")
    assert third.slot == first.slot
    with pytest.raises(RuntimeError, match="closed"):
        first.prepare("x", SessionSettings(), None, None)
    second.close()
    third.close()
    assert engine.free_slots == 2
