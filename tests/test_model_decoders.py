"""Decoders of the model runtime: Qwen3 LLM (llm.py), Llama-style TTS (tts.py), shared layers (layers.py)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from workers.model.layers import round_up_kv_len
from workers.model.llm import Qwen3ForCausalLM
from workers.model.presets import FULL, TINY
from workers.model.tts import MiniCPMTTS, frequency_penalty


def make_llm(args=TINY.llm, dtype=torch.float32, slots=2, max_len=64, seed=0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    llm = Qwen3ForCausalLM(args).to(dtype)
    llm.init_weights()
    llm.model.setup_caches(slots, max_len)
    return llm.eval()


def make_tts(args=TINY.tts, slots=2, max_len=256, seed=0) -> MiniCPMTTS:
    torch.manual_seed(seed)
    tts = MiniCPMTTS(args)
    tts.init_weights()
    tts.model.setup_caches(slots, max_len)
    return tts.eval()


def random_embeds(n: int, hidden: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(1, n, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llm_forward_shapes_and_dtypes(dtype):
    llm = make_llm(dtype=dtype)
    with torch.no_grad():
        hidden = llm.model(llm.embed(torch.tensor([1, 2, 3, 151706])), torch.arange(4), 0, 8)
        logits = llm.logits(hidden[:, -1])
    assert hidden.shape == (1, 4, TINY.llm.hidden) and hidden.dtype == dtype
    assert logits.shape == (1, TINY.llm.vocab) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_llm_parameter_names_and_shapes_full_size():
    with torch.device("meta"):
        llm = Qwen3ForCausalLM(FULL.llm)
    shapes = {f"llm.{name}": tuple(t.shape) for name, t in llm.state_dict().items()}
    layer = "llm.model.layers.7."
    expected = {
        "llm.model.embed_tokens.weight": (151748, 4096),
        "llm.lm_head.weight": (151748, 4096),
        "llm.model.norm.weight": (4096,),
        layer + "self_attn.q_proj.weight": (4096, 4096),
        layer + "self_attn.o_proj.weight": (4096, 4096),
        layer + "self_attn.k_proj.weight": (1024, 4096),
        layer + "self_attn.v_proj.weight": (1024, 4096),
        layer + "self_attn.q_norm.weight": (128,),
        layer + "self_attn.k_norm.weight": (128,),
        layer + "mlp.gate_proj.weight": (12288, 4096),
        layer + "mlp.up_proj.weight": (12288, 4096),
        layer + "mlp.down_proj.weight": (4096, 12288),
        layer + "input_layernorm.weight": (4096,),
        layer + "post_attention_layernorm.weight": (4096,),
    }
    assert {name: shapes.get(name) for name in expected} == expected
    assert len([n for n in shapes if n.startswith(layer)]) == 11
    assert len(shapes) == 36 * 11 + 3  # nothing else: no caches, rotary tables or fused copies
    assert all(re.fullmatch(r"llm\.(model\.(embed_tokens|norm|layers\.\d+\.[\w.]+)|lm_head)\.weight", n)
               for n in shapes)


def test_tts_parameter_names_and_shapes_full_size():
    with torch.device("meta"):
        tts = MiniCPMTTS(FULL.tts)
    shapes = {f"tts.{name}": tuple(t.shape) for name, t in tts.state_dict().items()}
    expected = {
        "tts.emb_text.weight": (152064, 768),
        "tts.emb_code.0.weight": (6562, 768),
        "tts.model.embed_tokens.weight": (32000, 768),
        "tts.model.layers.19.self_attn.q_proj.weight": (768, 768),
        "tts.model.layers.19.self_attn.k_proj.weight": (768, 768),
        "tts.model.layers.19.mlp.gate_proj.weight": (3072, 768),
        "tts.model.layers.19.mlp.down_proj.weight": (768, 3072),
        "tts.model.layers.19.input_layernorm.weight": (768,),
        "tts.model.norm.weight": (768,),
        "tts.projector_semantic.linear1.weight": (768, 4096),
        "tts.projector_semantic.linear1.bias": (768,),
        "tts.projector_semantic.linear2.weight": (768, 768),
        "tts.projector_spk.linear2.bias": (768,),
        "tts.head_code.0.parametrizations.weight.original0": (6562, 1),
        "tts.head_code.0.parametrizations.weight.original1": (6562, 768),
    }
    assert {name: shapes.get(name) for name in expected} == expected
    assert not any("q_norm" in n or "k_norm" in n or n.endswith("head_code.0.weight") for n in shapes)


def test_full_size_parameter_counts_on_meta():
    with torch.device("meta"):
        llm = Qwen3ForCausalLM(FULL.llm)
        tts = MiniCPMTTS(FULL.tts)
    assert llm.lm_head.weight is not llm.model.embed_tokens.weight  # untied at full size
    llm_params = sum(p.numel() for p in llm.parameters())  # parameters() yields shared tensors once
    tts_params = sum(p.numel() for p in tts.parameters())
    assert abs(llm_params - 8.19e9) / 8.19e9 < 0.02
    # MODEL.md quotes ~0.33 B; 0.348 B with the unused 32000x768 model.embed_tokens, 0.323 B without.
    assert 0.32e9 < tts_params < 0.36e9
    assert all(p.device.type == "meta" for p in llm.parameters())


def test_kv_cache_bytes_and_reallocation():
    with torch.device("meta"):
        llm = Qwen3ForCausalLM(FULL.llm).to(torch.bfloat16)
    assert llm.model.kv_cache_bytes(1, 8192) == 8192 * 144 * 1024  # MODEL.md §5: 144 KiB per token
    llm.model.setup_caches(4, 1024)
    llm.model.setup_caches(1, 2048)
    cache = llm.model.layers[0].self_attn.kv_cache
    assert cache.k_cache.shape == (1, 8, 2048, 128) and cache.k_cache.dtype == torch.bfloat16
    assert llm.model.cache_max_len == 2048


def test_meta_build_then_materialise_keeps_tied_head():
    with torch.device("meta"):
        llm = Qwen3ForCausalLM(TINY.llm)
    llm.to_empty(device="cpu")
    llm.init_weights()
    llm.model.setup_caches(1, 16)
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    with torch.no_grad():
        hidden = llm.model(llm.embed(torch.tensor([5, 6])), torch.arange(2), 0, 16)
    assert torch.isfinite(llm.logits(hidden[:, -1])).all()
    assert llm.model.rope_cos[0].eq(1).all() and llm.model.rope_sin[0].eq(0).all()


def test_incremental_decode_matches_full_forward():
    llm = make_llm()
    embeds = random_embeds(12, TINY.llm.hidden)
    with torch.no_grad():
        full = llm.model(embeds, torch.arange(12), 1, 12)
        steps = [llm.model(embeds[:, :5], torch.arange(5), 0, 5)]
        for pos in range(5, 12):
            steps.append(llm.model(embeds[:, pos:pos + 1], torch.tensor([pos]), 0, pos + 1))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_prefill_accepts_attention_output_in_any_memory_layout(monkeypatch: pytest.MonkeyPatch):
    """CUDA's fp32 attention kernels return [B, H, T, D] as a transposed view of [B, T, H, D] memory (found
    by the GPU session test); the layer must not assume SDPA's output is contiguous."""
    llm = make_llm()
    embeds = random_embeds(6, TINY.llm.hidden)
    sdpa = F.scaled_dot_product_attention

    def strided_sdpa(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, T, H, D] in memory

    with torch.no_grad():
        expected = llm.model(embeds, torch.arange(6), 0, 8)
        monkeypatch.setattr(F, "scaled_dot_product_attention", strided_sdpa)
        actual = llm.model(embeds, torch.arange(6), 1, 8)
    torch.testing.assert_close(actual, expected)


def test_decode_step_traces_as_one_graph_and_updates_the_cache():
    llm = make_llm()
    compiled = torch.compile(llm.model, fullgraph=True, backend="aot_eager", dynamic=False)
    prompt, step = random_embeds(4, TINY.llm.hidden), random_embeds(1, TINY.llm.hidden, seed=2)
    with torch.no_grad():
        llm.model(prompt, torch.arange(4), 0, 8)
        eager = llm.model(step, torch.tensor([4]), 0, 8)
        llm.model(prompt, torch.arange(4), 1, 8)
        traced = compiled(step, torch.tensor([4]), 1, 8)
    torch.testing.assert_close(traced, eager)
    cache = llm.model.layers[-1].self_attn.kv_cache
    torch.testing.assert_close(cache.k_cache[1, :, :5], cache.k_cache[0, :, :5])


def test_larger_kv_len_bucket_gives_same_result():
    llm = make_llm()
    embeds = random_embeds(9, TINY.llm.hidden)
    with torch.no_grad():
        exact = llm.model(embeds, torch.arange(9), 0, 9)
        bucketed = llm.model(embeds, torch.arange(9), 1, round_up_kv_len(9, 64, multiple=32))
        exact_step = llm.model(embeds[:, :1] * 2, torch.tensor([9]), 0, 10)
        bucketed_step = llm.model(embeds[:, :1] * 2, torch.tensor([9]), 1, 64)
    torch.testing.assert_close(bucketed, exact, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bucketed_step, exact_step, atol=1e-6, rtol=1e-6)


def test_evict_rerotates_like_recomputing_kept_tokens():
    # One layer: every cached K/V depends only on its own token, so recomputing is the exact reference.
    llm = make_llm(args=replace(TINY.llm, layers=1))
    embeds = random_embeds(20, TINY.llm.hidden)
    new_token = random_embeds(1, TINY.llm.hidden, seed=7)
    kept = torch.cat([embeds[:, :4], embeds[:, 9:]], dim=1)  # evict positions [4, 9)
    with torch.no_grad():
        llm.model(embeds, torch.arange(20), 0, 20)
        llm.model.evict(0, 4, 9, 20)
        after_evict = llm.model(new_token, torch.tensor([15]), 0, 16)
        llm.model(kept, torch.arange(15), 1, 15)
        recomputed = llm.model(new_token, torch.tensor([15]), 1, 16)
    cache = llm.model.layers[0].self_attn.kv_cache
    assert F.cosine_similarity(after_evict.flatten(), recomputed.flatten(), dim=0) > 0.9999
    torch.testing.assert_close(cache.k_cache[0, :, :16], cache.k_cache[1, :, :16], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache.v_cache[0, :, :16], cache.v_cache[1, :, :16])


def test_fuse_projections_keeps_names_outputs_and_loading():
    llm, other = make_llm(), make_llm(seed=3)
    embeds = random_embeds(6, TINY.llm.hidden)
    names_before = list(llm.state_dict())
    with torch.no_grad():
        unfused = llm.model(embeds, torch.arange(6), 0, 6)
        other_out = other.model(embeds, torch.arange(6), 0, 6)
        llm.model.fuse_projections()
        fused = llm.model(embeds, torch.arange(6), 0, 6)
        llm.load_state_dict(other.state_dict())  # in-place copy lands in the fused matrices
        fused_loaded = llm.model(embeds, torch.arange(6), 0, 6)
    assert list(llm.state_dict()) == names_before
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_loaded, other_out, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_keeps_checkpoint_names():
    llm, tts = make_llm(), make_tts()
    llm_copy, tts_copy = make_llm(seed=5), make_tts(seed=5)
    llm_copy.load_state_dict(llm.state_dict(), strict=True)
    tts_copy.load_state_dict(tts.state_dict(), strict=True)
    assert list(llm_copy.state_dict()) == list(llm.state_dict())
    assert list(tts_copy.state_dict()) == list(tts.state_dict())
    for original, copy in [(llm, llm_copy), (tts, tts_copy)]:
        for name, tensor in original.state_dict().items():
            assert torch.equal(copy.state_dict()[name], tensor), name


def test_folded_head_matches_weight_norm_and_follows_loads():
    tts, other = make_tts(), make_tts(seed=9)
    hidden = torch.randn(1, TINY.tts.hidden)
    with torch.no_grad():
        reference = tts.code_logits(hidden)
        tts.fold_weight_norm()
        folded = tts.code_logits(hidden)
        tts.load_state_dict(other.state_dict())
        reloaded = tts.code_logits(hidden)
    torch.testing.assert_close(folded, reference)
    torch.testing.assert_close(reloaded, other.code_logits(hidden))


def test_tts_condition_layout():
    tts = make_tts()
    ids = torch.tensor([100, 200, 300])
    llm_hidden = torch.randn(3, TINY.tts.llm_dim)
    with torch.no_grad():
        condition = tts.build_condition(ids, llm_hidden)
        empty = tts.build_condition(ids[:0], llm_hidden[:0])
        bos = tts.emb_text(torch.tensor([TINY.tts.audio_bos_token_id]))
    assert condition.shape == (1, 4, TINY.tts.hidden) and empty.shape == (1, 1, TINY.tts.hidden)
    torch.testing.assert_close(condition[0, 3:], bos)
    torch.testing.assert_close(empty[0], bos)
    semantic_part = condition[0, :3] - tts.emb_text(ids).detach()
    torch.testing.assert_close(semantic_part.norm(dim=-1), torch.ones(3))


def test_frequency_penalty_is_sign_aware():
    logits = torch.tensor([[2.0, -2.0, 2.0, 1.0]])
    penalised = frequency_penalty(logits, torch.tensor([0, 0, 1]), 1.05)
    torch.testing.assert_close(penalised, torch.tensor([[2.0 / 1.05**2, -2.0 * 1.05, 2.0, 1.0]]))


def test_generate_codes_deterministic_and_resettable():
    tts = make_tts()
    condition = tts.build_condition(torch.tensor([11, 12]), torch.randn(2, TINY.tts.llm_dim))
    first, next_pos = tts.generate_codes(condition, 0, 0, 0.8, 5, 5, torch.Generator().manual_seed(1))
    tts.generate_codes(condition, 0, next_pos, 0.8, 5, 5, torch.Generator().manual_seed(2))  # same turn
    again, _ = tts.generate_codes(condition, 0, 0, 0.8, 5, 5, torch.Generator().manual_seed(1))  # new turn
    assert first == again and len(first) == 5 and all(0 <= c < tts.eos_code for c in first)
    assert next_pos == 3 + 4  # condition + the 4 codes fed back; the last sampled code is not fed


def test_generate_codes_continues_the_turn_cache():
    tts = make_tts()
    condition = tts.build_condition(torch.tensor([11, 12]), torch.randn(2, TINY.tts.llm_dim))
    first, next_pos = tts.generate_codes(condition, 0, 0, 0.0, 3, 3, None)
    second, _ = tts.generate_codes(condition, 0, next_pos, 0.0, 1, 1, None)
    with torch.no_grad():  # reference: the whole turn so far in one forward in another slot
        fed_codes = tts.emb_code[0](torch.tensor([first[:-1]]))
        sequence = torch.cat([condition, fed_codes, condition], dim=1)
        hidden = tts.model(sequence, torch.arange(sequence.shape[1]), 1, sequence.shape[1])
    logits_without_eos = tts.code_logits(hidden[:, -1])[0, :tts.eos_code]  # min_new 1 masks EOS
    assert second == [int(logits_without_eos.argmax())]


def test_generate_codes_respects_min_new_max_new_and_eos():
    tts = make_tts(args=replace(TINY.tts, num_audio_tokens=4))  # codes 0..2, EOS 3: EOS comes quickly
    condition = tts.build_condition(torch.tensor([7]), torch.randn(1, TINY.tts.llm_dim))
    stopped, stop_pos = tts.generate_codes(condition, 0, 0, 1.0, 0, 60, torch.Generator().manual_seed(0))
    assert len(stopped) < 60 and stop_pos == 2 + len(stopped)  # EOS: every returned code was fed
    forced, forced_pos = tts.generate_codes(condition, 0, 0, 1.0, 30, 30, torch.Generator().manual_seed(0))
    assert len(forced) == 30 and all(c < 3 for c in forced) and forced_pos == 2 + 29
    with pytest.raises(ValueError, match="TTS cache too short"):
        tts.generate_codes(condition, 0, 250, 1.0, 0, 30, None)
