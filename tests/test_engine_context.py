"""Context policies (MODEL.md §5): the unit ledger, sliding eviction under a small cap, context_full."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import ServiceConfig, SessionSettings
from workers.engine.context import KVLedger, PolicyLimits, UnitRecord
from workers.engine.engine import DuplexEngine
from workers.model import tokens


def _record(index: int, length: int, text_ids: tuple[int, ...] = ()) -> UnitRecord:
    ids = [tokens.SPEAK, *text_ids, tokens.CHUNK_EOS, tokens.UNIT_END] if text_ids else [tokens.LISTEN,
                                                                                        tokens.UNIT_END]
    return UnitRecord(index=index, length=length, kind="speak" if text_ids else "listen", ids=ids, text="")


class RecordingKV:
    """Records the policy's KV operations (the session-level tests below run the real ones)."""

    def __init__(self) -> None:
        self.evicted: list[tuple[int, int, int]] = []
        self.written: list[tuple[list[int], int]] = []

    def evict_positions(self, start: int, end: int, length: int) -> None:
        self.evicted.append((start, end, length))

    def write_positions(self, ids: list[int], start: int) -> None:
        self.written.append((list(ids), start))


def test_limits_scale_down_to_a_small_cap() -> None:
    limits = PolicyLimits.clamp(cap=256, high=4000, low=3500, max_units=24, previous_tokens=500)
    assert (limits.high, limits.low) == (256, 224)
    assert PolicyLimits.clamp(cap=8192, high=4000, low=3500, max_units=24, previous_tokens=500).high == 4000


def test_sliding_evicts_whole_oldest_units_after_the_prefix() -> None:
    ledger = KVLedger("sliding", PolicyLimits.clamp(8192, high=100, low=60, max_units=24, previous_tokens=0))
    ledger.set_prefix(20, [])
    kv = RecordingKV()
    for index in range(5):
        ledger.record(_record(index, 20))  # 20 + 5 x 20 = 120 > high
    assert ledger.after_finalize(kv) == 60 and kv.evicted == [(20, 80, 120)]  # units 0-2 in one call
    assert [u.index for u in ledger.units] == [3, 4] and ledger.length == 60
    assert ledger.after_finalize(kv) == 0 and len(kv.evicted) == 1 and not kv.written


def test_make_room_and_its_limits() -> None:
    sliding = KVLedger("sliding", PolicyLimits.clamp(200, high=4000, low=3500, max_units=24, previous_tokens=0))
    sliding.set_prefix(50, [])
    for index in range(6):
        sliding.record(_record(index, 25))  # length 200 = cap
    kv = RecordingKV()
    assert sliding.make_room(40, kv)
    assert sliding.length <= 160 and kv.evicted[0][0] == 50
    assert not sliding.make_room(151, kv)  # the prefix alone leaves too little room
    none = KVLedger("none", PolicyLimits.clamp(200, 4000, 3500, 24, 0))
    none.set_prefix(150, [])
    none.record(_record(0, 30))
    assert none.make_room(20, kv) and not none.make_room(21, kv)


def test_context_policy_moves_dropped_text_into_the_previous_block() -> None:
    ledger = KVLedger("context", PolicyLimits.clamp(8192, 4000, 3500, max_units=2, previous_tokens=3))
    ledger.set_prefix(30, [1, 2])  # the block starts at 28: <|audio_end|> <|im_end|> at 28, 29
    for index, text in enumerate([(500, 501), (), (502, 503), (504,)]):
        ledger.record(_record(index, 20, text))
    kv = RecordingKV()
    assert ledger.after_finalize(kv) == 36  # drops units 0 and 1 (40 positions), the block grows by 4
    block = [1, 2, 500, 501, tokens.AUDIO_END, tokens.IM_END]
    assert kv.written == [(block, 28)] and kv.evicted == [(34, 70, 110)]
    assert ledger.prefix_length == 34 and ledger.length == 74 and [u.index for u in ledger.units] == [2, 3]
    ledger.record(_record(4, 20, (505,)))
    ledger.after_finalize(kv)  # text is trimmed to its last 3 tokens
    assert kv.written[-1] == ([1, 2, 501, 502, 503, tokens.AUDIO_END, tokens.IM_END], 28)
    assert ledger.prefix_length == 35 and [u.index for u in ledger.units] == [3, 4]


def test_context_policy_drops_units_to_make_room() -> None:
    ledger = KVLedger("context", PolicyLimits.clamp(200, 4000, 3500, max_units=24, previous_tokens=500))
    ledger.set_prefix(30, [1])
    for index in range(7):
        ledger.record(_record(index, 20))  # listening units: no text, the block stays as it is
    kv = RecordingKV()
    assert ledger.make_room(50, kv) and ledger.length + 50 <= 200
    assert not kv.written and ledger.prefix_length == 30 and kv.evicted[0][:2] == (30, 50)
    assert not ledger.make_room(171, kv) and not ledger.units


@pytest.fixture(scope="module")
def small_engine() -> DuplexEngine:
    cfg = ServiceConfig()
    cfg.duplex.max_kv_tokens = 512
    return DuplexEngine(cfg, device="cpu")


def _omni_units(engine: DuplexEngine, settings: SessionSettings, units: int, policy: str) -> list:
    engine.cfg.duplex.context_policy = policy
    session = engine.new_session("ctx")
    frame = Image.new("RGB", (640, 480), (200, 40, 40))
    rng = np.random.default_rng(0)
    results = []
    try:
        session.prepare("Streaming Omni Conversation.", settings, None, None)
        for _ in range(units):
            session.push_audio((0.1 * rng.standard_normal(16_000)).astype(np.float32))
            result = session.run_unit([frame])
            results.append(result)
            if result.session_end:
                break
            session.finalize()
            assert session.position == session.ledger.length  # positions stay contiguous
        return results
    finally:
        session.close()


def test_sliding_session_runs_three_times_past_its_cache(small_engine: DuplexEngine) -> None:
    settings = SessionSettings(seed=1, max_kv_tokens=256, force_listen_count=1000)
    results = _omni_units(small_engine, settings, units=10, policy="sliding")  # 10 x 79 positions > 3 x 256
    assert len(results) == 10 and all(r.session_end is None for r in results)
    assert all(r.kv_cache_length <= 256 for r in results)
    assert all(r.is_listen for r in results)


def test_context_session_runs_three_times_past_its_cache(small_engine: DuplexEngine) -> None:
    small_engine.cfg.duplex.context_max_units = 2
    settings = SessionSettings(seed=1, max_kv_tokens=256, force_listen_count=1000)
    results = _omni_units(small_engine, settings, units=10, policy="context")
    assert len(results) == 10 and all(r.session_end is None and r.kv_cache_length <= 256 for r in results)


def test_no_policy_ends_the_session_with_context_full(small_engine: DuplexEngine) -> None:
    settings = SessionSettings(seed=1, max_kv_tokens=256, force_listen_count=1000)
    results = _omni_units(small_engine, settings, units=10, policy="none")
    assert results[-1].session_end == "context_full" and len(results) < 10
    assert all(r.session_end is None for r in results[:-1])


def test_context_policy_keeps_spoken_text_in_the_prefix(small_engine: DuplexEngine) -> None:
    small_engine.cfg.duplex.context_policy = "context"
    small_engine.cfg.duplex.context_max_units = 2
    session = small_engine.new_session("ctx-text")
    rng = np.random.default_rng(1)
    try:
        session.prepare("Streaming Omni Conversation.", SessionSettings(
            seed=2, force_listen_count=0, listen_prob_scale=0.0, max_new_speak_tokens_per_chunk=4), None, None)
        prefix = session.ledger.prefix_length
        texts = []
        for _ in range(5):
            session.push_audio((0.1 * rng.standard_normal(16_000)).astype(np.float32))
            texts.append(session.run_unit([]).text)
            session.finalize()
            assert session.position == session.ledger.length and len(session.ledger.units) <= 2
        kept_text = small_engine.tokenizer.decode(session.ledger.previous.text_ids)
        assert kept_text and kept_text == "".join(texts[:3])  # the three dropped units' text, in order
        assert session.ledger.prefix_length == prefix + len(session.ledger.previous.ids()) - 2
    finally:
        session.close()


@pytest.mark.parametrize("policy", ["sliding", "context"])
def test_lazy_finalize_leaves_the_cache_an_immediate_feed_leaves(policy: str) -> None:
    """finalize() only reserves `[T, </unit>]`; the next forward feeds them. Two sessions on two slots, one
    feeding them right after each finalize, must choose the same tokens and hold the same KV, through
    evictions (which write the reserved ids first) and re-encoded previous blocks."""
    cfg = ServiceConfig()
    cfg.service.sessions_per_worker = 2
    cfg.duplex.max_kv_tokens = 512
    cfg.duplex.context_policy = policy  # type: ignore[assignment]
    cfg.duplex.context_max_units = 2
    engine = DuplexEngine(cfg, device="cpu")
    settings = SessionSettings(seed=3, max_kv_tokens=256, force_listen_count=0, listen_prob_scale=0.0,
                               max_new_speak_tokens_per_chunk=6, decode_mode="greedy")
    lazy, immediate = engine.new_session("lazy"), engine.new_session("immediate")
    rng = np.random.default_rng(4)
    try:
        for session in (lazy, immediate):
            session.prepare("Streaming Omni Conversation.", settings, None, None)
        lazy_units = 0
        for _ in range(16):  # about 19 positions per unit: past the cap of 256
            audio = (0.1 * rng.standard_normal(16_000)).astype(np.float32)
            results = []
            for session in (lazy, immediate):
                session.push_audio(audio)
                results.append(session.run_unit([]))
                session.finalize()
            immediate.feed_unfed()
            lazy_units += bool(lazy.unfed_ids)  # empty only when this finalize's policy evicted
            assert not immediate.unfed_ids and lazy.position == immediate.position
            assert [r.text for r in results[:1]] == [r.text for r in results[1:]]
            assert [u.ids for u in lazy.ledger.units] == [u.ids for u in immediate.ledger.units]
        assert lazy_units >= (8 if policy == "sliding" else 2)  # context: every later finalize drops a unit
        lazy.feed_unfed()
        for layer in engine.model.llm.model.layers:
            cache = layer.self_attn.kv_cache
            for buffer in (cache.k_cache, cache.v_cache):
                torch.testing.assert_close(buffer[lazy.slot, :, :lazy.position],
                                           buffer[immediate.slot, :, :immediate.position], atol=1e-4, rtol=1e-4)
        assert lazy.ledger.length == lazy.position < 16 * 19  # the policy did trim the cache
    finally:
        lazy.close()
        immediate.close()
