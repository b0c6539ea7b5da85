"""Sessions on different KV slots of one engine do not touch each other's state (issue 2, item 6).

A session run alone and the same session run interleaved, unit by unit, with a second session on
the other slot must leave bit-identical LLM and TTS key caches and give identical results. Random
tiny weights make greedy tokens nearly context-free, so the caches, not the tokens, are compared.
"""

from __future__ import annotations

import numpy as np
import torch

from common.config import ServiceConfig, SessionSettings
from workers.engine.engine import DuplexEngine
from workers.engine.session import DuplexSession

UNITS = 4
SETTINGS = SessionSettings(decode_mode="greedy", force_listen_count=1, seed=0)


def _engine() -> DuplexEngine:
    cfg = ServiceConfig.model_validate({"model": {"preset": "tiny", "device": "cpu", "seed": 3},
                                        "service": {"sessions_per_worker": 2}})
    return DuplexEngine(cfg)


def _chunk(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(16_000) * 0.1).astype(np.float32)


def _unit(session: DuplexSession, seed: int) -> tuple:
    session.push_audio(_chunk(seed))
    result = session.run_unit([])
    session.finalize()
    return result.is_listen, result.text, result.n_tts_tokens, result.kv_cache_length, result.audio.tobytes()


def _slot_keys(engine: DuplexEngine, session: DuplexSession) -> list[torch.Tensor]:
    """This session's live LLM keys and all its TTS keys, per layer."""
    llm = [layer.self_attn.kv_cache.k_cache[session.slot, :, :session.position].clone()
           for layer in engine.model.llm.model.layers]
    tts = [layer.self_attn.kv_cache.k_cache[session.slot].clone() for layer in engine.model.tts.model.layers]
    return llm + tts


def _run(interleaved: bool) -> tuple[list[tuple], list[torch.Tensor]]:
    engine = _engine()
    main = engine.new_session("main")
    main.prepare("You are a helpful assistant.", SETTINGS, None, None)
    other = None
    if interleaved:
        other = engine.new_session("other")
        other.prepare("A different system prompt for the other slot.", SETTINGS, _chunk(99), None)
    results = []
    for unit in range(UNITS):
        results.append(_unit(main, seed=unit))
        if other is not None:
            _unit(other, seed=1000 + unit)
    keys = _slot_keys(engine, main)
    main.close()
    if other is not None:
        assert other.slot != main.slot
        other.close()
    return results, keys


def test_a_session_beside_another_is_bit_identical_to_it_alone():
    alone_results, alone_keys = _run(interleaved=False)
    beside_results, beside_keys = _run(interleaved=True)
    assert any(not is_listen for is_listen, *_ in alone_results), "no speech: TTS state not covered"
    assert beside_results == alone_results
    for alone, beside in zip(alone_keys, beside_keys, strict=True):
        assert torch.equal(alone, beside)
