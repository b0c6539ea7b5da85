"""Checkpoint round trip (sharded + index + config.json), key reporting, partial-load refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from workers.model.omni import build_model
from workers.model.presets import TINY


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(11)
    model = build_model(TINY, "cpu", torch.float32)
    out = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny", shards=3)
    return out, model


def _llm_logits(model: torch.nn.Module) -> torch.Tensor:
    model.llm.model.setup_caches(1, 64)
    hidden = model.llm.model(model.llm.embed(torch.tensor([1, 2, 3, 151705])), torch.arange(4), 0, 64)
    return model.llm.logits(hidden[:, -1])


def test_sharded_layout_is_written(saved: tuple[Path, torch.nn.Module]) -> None:
    out, _ = saved
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({v for v in index["weight_map"].values()})
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 256 and config["vision_config"]["num_hidden_layers"] == 3
    assert "llm.lm_head.weight" not in index["weight_map"]  # tied to the embedding, stored once


def test_round_trip_gives_identical_weights_and_outputs(saved: tuple[Path, torch.nn.Module]) -> None:
    out, original = saved
    torch.manual_seed(99)  # a different random init must be fully overwritten
    loaded, report = load_checkpoint(out, "cpu", torch.float32, base=TINY)
    assert report.complete and not report.missing and not report.unexpected
    assert "llm.lm_head.weight" in report.tolerated_missing
    assert loaded.args == original.args
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(_llm_logits(loaded), _llm_logits(original))
        pixels = torch.randn(1, 3, 28, 42)
        assert torch.equal(loaded.encode_images([pixels[0]]), original.encode_images([pixels[0]]))


def test_load_in_bfloat16(saved: tuple[Path, torch.nn.Module]) -> None:
    loaded, _ = load_checkpoint(saved[0], "cpu", torch.bfloat16, base=TINY)
    assert loaded.llm.lm_head.weight.dtype == torch.bfloat16
    expected = saved[1].state_dict()["vpm.post_layernorm.weight"].to(torch.bfloat16)
    assert torch.equal(loaded.state_dict()["vpm.post_layernorm.weight"], expected)


def _single_file_copy(source: Path, target: Path, edit) -> Path:  # noqa: ANN001 - a dict -> None callable
    target.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for shard in source.glob("model-*.safetensors"):
        tensors.update(load_file(str(shard)))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"))
    (target / "config.json").write_text((source / "config.json").read_text())
    return target


def test_missing_and_unexpected_keys_are_reported_and_refused(saved: tuple[Path, torch.nn.Module],
                                                             tmp_path: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["apm.layer_norm.weight"]
        tensors["llm.model.layers.0.extra.weight"] = torch.zeros(2)

    broken = _single_file_copy(saved[0], tmp_path / "broken", edit)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(broken, "cpu", torch.float32, base=TINY)
    assert "apm.layer_norm.weight" in str(err.value) and "llm.model.layers.0.extra.weight" in str(err.value)
    model, report = load_checkpoint(broken, "cpu", torch.float32, base=TINY, allow_partial_load=True)
    assert report.missing == ["apm.layer_norm.weight"]
    assert report.unexpected == ["llm.model.layers.0.extra.weight"]
    assert not report.complete


def test_tolerated_names(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["tts.model.embed_tokens.weight"]
        tensors["vpm.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(256, 64)  # the dropped last layer
        tensors["vision_extra.weight"] = torch.zeros(3)  # a prefix we do not build

    tolerant = _single_file_copy(saved[0], tmp_path / "tolerant", edit)
    _, report = load_checkpoint(tolerant, "cpu", torch.float32, base=TINY)
    assert report.complete
    assert "tts.model.embed_tokens.weight" in report.tolerated_missing
    assert sorted(report.ignored_unexpected) == ["vision_extra.weight", "vpm.encoder.layers.2.mlp.fc1.weight"]


def test_shape_mismatch_is_an_error(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors["resampler.query"] = torch.zeros(3, 3)

    bad = _single_file_copy(saved[0], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match="resampler.query"):
        load_checkpoint(bad, "cpu", torch.float32, base=TINY)


def test_directory_without_weights_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(tmp_path, "cpu", torch.float32, base=TINY)
