"""OmniModel assembly: full-size parameter counts on the meta device, tiny build and vision path."""

from __future__ import annotations

import torch

from workers.model.omni import SUBMODULES, build_model, count_parameters
from workers.model.presets import FULL, TINY


def test_full_preset_parameter_counts_on_meta() -> None:
    counts = count_parameters(FULL)  # meta device: nothing is allocated
    for name, expected in (("llm", 8.19e9), ("vpm", 0.40e9), ("apm", 0.31e9)):
        assert abs(counts[name] - expected) / expected < 0.02, (name, counts[name])
    assert 9.2e9 < counts["total"] < 9.5e9


def test_state_dict_prefixes_and_tiny_build() -> None:
    model = build_model(TINY, "cpu", torch.bfloat16)
    prefixes = {name.split(".", 1)[0] for name in model.state_dict()}
    assert prefixes == set(SUBMODULES)
    assert model.llm.lm_head.weight.dtype == torch.bfloat16 and model.vpm_dtype == torch.bfloat16
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight  # tiny ties the head
    std = model.llm.model.layers[0].mlp.up_proj.weight.float().std().item()
    assert 0.015 < std < 0.025  # MODEL.md §2.4 init, normal(0, 0.02)
    assert not any(p.requires_grad for p in model.parameters())


def test_encode_images_keeps_order_across_sizes() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, "cpu", torch.float32)
    big, small = torch.randn(3, 28, 42), torch.randn(3, 14, 28)
    together = model.encode_images([big, small, big])
    assert together.shape == (3, TINY.resampler.queries, TINY.llm.hidden)
    assert torch.allclose(together[0], model.encode_images([big])[0], atol=1e-5)
    assert torch.allclose(together[1], model.encode_images([small])[0], atol=1e-5)
