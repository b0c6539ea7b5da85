"""Checkpoint loading and saving in the Hugging Face MiniCPM-o layout (MODEL.md §1).

A checkpoint directory holds `config.json` (dimensions: `presets.args_from_hf_config`) and either
`model.safetensors` or shards listed by `model.safetensors.index.json` (`weight_map`: name -> shard).
Tensors are read one by one with safetensors straight onto the target device and copied into the
already-placed module in its dtype, so no second full host copy of the model exists.

Every checkpoint name is matched against our state dict by name and shape. Tolerated: missing
`tts.model.embed_tokens.weight` (never used), missing names that share storage with a loaded one (tied
embeddings), unexpected names of the dropped vision layer or of a prefix we do not build (warned).
Anything else missing or unexpected refuses the load unless `allow_partial_load`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workers.model.omni import SUBMODULES, OmniModel, build_model
from workers.model.presets import FULL, OmniArgs, args_from_hf_config

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOLERATED_MISSING = frozenset({"tts.model.embed_tokens.weight"})


class CheckpointError(RuntimeError):
    """The checkpoint cannot be loaded into our modules; the message names the tensors."""


@dataclass
class LoadReport:
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # refused unless allow_partial_load
    unexpected: list[str] = field(default_factory=list)  # refused unless allow_partial_load
    tolerated_missing: list[str] = field(default_factory=list)
    ignored_unexpected: list[str] = field(default_factory=list)  # warned

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path} not found: a checkpoint directory needs its config.json")
    return json.loads(path.read_text())


def shard_names(model_dir: Path) -> dict[Path, list[str]]:
    """Tensor names per safetensors file, from the index or the single model.safetensors."""
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(model_dir / shard, []).append(name)
        return files
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{model_dir} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
    with safe_open(str(single), framework="pt") as f:
        return {single: list(f.keys())}


def _safetensors_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def _is_ignorable_unexpected(name: str, args: OmniArgs) -> bool:
    """A dropped vision layer (index >= layers_run) or a prefix we do not build."""
    match = re.match(r"vpm\.encoder\.layers\.(\d+)\.", name)
    if match:
        return int(match.group(1)) >= args.vision.layers_run
    return name.split(".", 1)[0] not in SUBMODULES


@torch.no_grad()
def load_checkpoint(
    model_path: str | Path,
    device: torch.device | str,
    dtype: torch.dtype,
    base: OmniArgs = FULL,
    allow_partial_load: bool = False,
) -> tuple[OmniModel, LoadReport]:
    """Build the model from config.json on `device` and fill it from the safetensors files.

    Raises CheckpointError for a shape mismatch, and for missing/unexpected tensors unless
    allow_partial_load (then the report lists them and the missing ones keep their constructor init).
    """
    model_dir = Path(model_path)
    device = torch.device(device)
    args = args_from_hf_config(read_config(model_dir), base)
    model = build_model(args, device, dtype, init=False)
    targets = model.state_dict()
    report = LoadReport()
    loaded_storage: set[int] = set()
    loaded_names: set[str] = set()
    for path, names in shard_names(model_dir).items():
        with safe_open(str(path), framework="pt", device=_safetensors_device(device)) as f:
            for name in names:
                target = targets.get(name)
                if target is None:
                    (report.ignored_unexpected if _is_ignorable_unexpected(name, args)
                     else report.unexpected).append(name)
                    continue
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)} != "
                                          f"model shape {tuple(target.shape)} (from {path.name})")
                target.copy_(tensor)
                loaded_names.add(name)
                loaded_storage.add(target.data_ptr())
    for name, target in targets.items():
        if name in loaded_names:
            continue
        if name in TOLERATED_MISSING or target.data_ptr() in loaded_storage:
            report.tolerated_missing.append(name)
        else:
            report.missing.append(name)
    report.loaded = len(loaded_names)
    if report.ignored_unexpected:
        log.warning("ignored %d checkpoint tensors we do not build, e.g. %s",
                    len(report.ignored_unexpected), report.ignored_unexpected[:3])
    if not report.complete:
        message = (f"checkpoint {model_dir} does not match the model: missing {_summary(report.missing)}; "
                   f"unexpected {_summary(report.unexpected)}")
        if not allow_partial_load:
            raise CheckpointError(message + " (set model.allow_partial_load to serve it anyway)")
        log.warning("partial load: %s", message)
    return model, report


def _summary(names: list[str], shown: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} ({', '.join(names[:shown])}{more})"


def hf_config_from_args(args: OmniArgs) -> dict[str, Any]:
    """A config.json that `args_from_hf_config` maps back to exactly `args` (with the same base preset)."""
    llm, vision, audio, tts = args.llm, args.vision, args.audio, args.tts
    return {
        "model_type": "minicpmo",
        "hidden_size": llm.hidden,
        "num_hidden_layers": llm.layers,
        "num_attention_heads": llm.heads,
        "num_key_value_heads": llm.kv_heads,
        "head_dim": llm.head_dim,
        "intermediate_size": llm.ffn,
        "vocab_size": llm.vocab,
        "rope_theta": llm.rope_theta,
        "rms_norm_eps": llm.rms_eps,
        "max_position_embeddings": llm.max_positions,
        "tie_word_embeddings": llm.tie_embeddings,
        "query_num": args.resampler.queries,
        "image_size": vision.image_size,
        "drop_vision_last_layer": vision.layers_run < vision.layers_configured,
        "audio_pool_step": audio.pool_step,
        "vision_config": {
            "hidden_size": vision.hidden,
            "intermediate_size": vision.ffn,
            "num_attention_heads": vision.heads,
            "num_hidden_layers": vision.layers_configured,
            "patch_size": vision.patch,
            "image_size": vision.grid * vision.patch,
        },
        "audio_config": {
            "num_mel_bins": audio.n_mels,
            "d_model": audio.d_model,
            "encoder_layers": audio.layers,
            "encoder_attention_heads": audio.heads,
            "encoder_ffn_dim": audio.ffn,
            "max_source_positions": audio.max_positions,
        },
        "tts_config": {
            "hidden_size": tts.hidden,
            "intermediate_size": tts.ffn,
            "num_hidden_layers": tts.layers,
            "num_attention_heads": tts.heads,
            "num_key_value_heads": tts.kv_heads,
            "max_position_embeddings": tts.max_positions,
            "num_audio_tokens": tts.num_audio_tokens,
            "num_text_tokens": tts.num_text_tokens,
            "llm_dim": tts.llm_dim,
            "audio_bos_token_id": tts.audio_bos_token_id,
        },
    }


def save_checkpoint(model: OmniModel, out_dir: str | Path, shards: int = 1) -> Path:
    """Write config.json and the state dict as safetensors: one `model.safetensors`, or `shards` files
    `model-0000k-of-0000N.safetensors` plus `model.safetensors.index.json`. Tied tensors are stored once.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(hf_config_from_args(model.args), indent=2))
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen_storage:
            continue
        seen_storage.add(tensor.data_ptr())
        tensors[name] = tensor.detach().to("cpu").contiguous()
    if shards <= 1:
        save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
        return out
    names = list(tensors)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        chunk = names[k * per_shard:(k + 1) * per_shard]
        file_name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(out / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file_name))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return out
