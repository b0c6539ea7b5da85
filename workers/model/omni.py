"""The whole MiniCPM-o module tree (MODEL.md §2) under the checkpoint's state-dict prefixes.

`OmniModel` only assembles the sub-modules and offers the vision path (vpm -> resampler) as one call;
the duplex algorithm lives in `workers/engine`. Token2wav is not part of the state dict: the engine
holds it beside the model.

Vision calls: by default same-size images share one batched vpm + resampler call. After
`use_captured_vision()` (the engine's `fast` mode on CUDA) each image runs alone through a
`CapturedCall` (workers/engine/graphs.py) of its patch grid: static input buffers and a CUDA graph.
`warmup_vision(grids)` captures the given grids; a grid met later is captured on first use and counted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from functools import partial

import torch
from torch import Tensor, nn

from workers.engine.graphs import CapturedCall, CapturedCalls
from workers.model.apm import AudioProjection, WhisperEncoder
from workers.model.layers import init_module_weights
from workers.model.llm import Qwen3ForCausalLM
from workers.model.presets import OmniArgs
from workers.model.resampler import Resampler
from workers.model.tts import MiniCPMTTS
from workers.model.vpm import SiglipVisionTransformer

SUBMODULES = ("llm", "vpm", "resampler", "apm", "audio_projection_layer", "tts")


class OmniModel(nn.Module):
    """llm, vpm, resampler, apm, audio_projection_layer, audio_avg_pooler (no weights), tts."""

    def __init__(self, args: OmniArgs) -> None:
        super().__init__()
        self.args = args
        self.llm = Qwen3ForCausalLM(args.llm)
        self.vpm = SiglipVisionTransformer(args.vision)
        self.resampler = Resampler(args.resampler)
        self.apm = WhisperEncoder(args.audio)
        self.audio_projection_layer = AudioProjection(args.audio)
        self.audio_avg_pooler = nn.AvgPool1d(args.audio.pool_step, stride=args.audio.pool_step)
        self.tts = MiniCPMTTS(args.tts)
        self.vision_calls: CapturedCalls | None = None  # per-grid captured calls; see use_captured_vision

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init (MODEL.md §2.4) of every sub-module, including its derived buffers."""
        for name in SUBMODULES:
            module = getattr(self, name)
            if hasattr(module, "init_weights"):
                module.init_weights()
            else:
                init_module_weights(module)

    @torch.no_grad()
    def encode_images(self, images: list[Tensor]) -> Tensor:
        """Images/slices [3, h, w] (normalised) -> LLM embeddings [N, queries, llm_hidden], input order.

        Same-size images share one vpm + resampler batch (the source frame and its slices usually differ);
        with captured vision calls each image runs alone through the call of its patch grid.
        """
        dtype = self.vpm_dtype
        if self.vision_calls is not None:
            calls, embeds = self.vision_calls, []
            for image in images:
                pixels = image[None].to(self.device, dtype)
                embeds.append(self._vision_call(calls, pixels)(pixels))
            return torch.cat(embeds)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            groups[tuple(image.shape[-2:])].append(index)
        out: list[Tensor | None] = [None] * len(images)
        patch = self.args.vision.patch
        for (height, width), indices in groups.items():
            pixels = torch.stack([images[i] for i in indices]).to(self.device, dtype)
            embeds = self._encode_grid((height // patch, width // patch), pixels)
            for row, index in enumerate(indices):
                out[index] = embeds[row]
        return torch.stack(out)  # type: ignore[arg-type]

    def _encode_grid(self, grid: tuple[int, int], pixels: Tensor) -> Tensor:
        """vpm + resampler of same-size images [N, 3, h, w] whose patch grid is `grid` (rows, cols)."""
        return self.resampler(self.vpm(pixels), grid)

    def use_captured_vision(self, cuda_graphs: bool = True) -> None:
        """Encode images one by one through per-grid `CapturedCall`s (CUDA graphs when `cuda_graphs`)."""
        self.vision_calls = CapturedCalls(cuda_graphs)

    @torch.no_grad()
    def warmup_vision(self, grids: Iterable[tuple[int, int]]) -> None:
        """Build the captured calls of these patch grids (rows, cols) now; later grids count as late."""
        if self.vision_calls is None:
            raise RuntimeError("warmup_vision needs use_captured_vision() first")
        patch = self.args.vision.patch
        for rows, cols in grids:
            pixels = torch.zeros(1, 3, rows * patch, cols * patch, device=self.device, dtype=self.vpm_dtype)
            self._vision_call(self.vision_calls, pixels)
        self.vision_calls.warm = True

    def _vision_call(self, calls: CapturedCalls, pixels: Tensor) -> CapturedCall:
        """The captured call for images of `pixels`' size [1, 3, h, w], built (with it as example) if new."""
        patch = self.args.vision.patch
        grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        call = calls.get(grid)
        if call is None:
            call = calls.add(grid, partial(self._encode_grid, grid), [pixels])
        return call

    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.lm_head.weight.dtype

    @property
    def vpm_dtype(self) -> torch.dtype:
        return next(self.vpm.parameters()).dtype


def build_model(
    args: OmniArgs,
    device: torch.device | str,
    dtype: torch.dtype,
    init: bool = True,
) -> OmniModel:
    """Build the model on `device` in `dtype`.

    init=True applies the random init of MODEL.md §2.4; the checkpoint loader passes False and
    overwrites every weight. Sub-modules are constructed one by one and cast before the next one is
    built, so peak memory is the final size plus one sub-module in fp32.
    """
    with torch.device("meta"):
        model = OmniModel(args)
    for name in SUBMODULES:
        with torch.device(device):
            module = type(getattr(model, name))(getattr(args, _ARGS_FIELD[name]))
        module.to(dtype)
        setattr(model, name, module)
    if init:
        model.init_weights()
    return model.eval().requires_grad_(False)


_ARGS_FIELD = {
    "llm": "llm",
    "vpm": "vision",
    "resampler": "resampler",
    "apm": "audio",
    "audio_projection_layer": "audio",
    "tts": "tts",
}


def count_parameters(args: OmniArgs) -> dict[str, int]:
    """Parameter count per state-dict prefix (tied weights counted once), built on the meta device."""
    with torch.device("meta"):
        model = OmniModel(args)
    seen: set[int] = set()
    counts: dict[str, int] = {}
    for name in SUBMODULES:
        total = 0
        for param in getattr(model, name).parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
        counts[name] = total
    counts["total"] = sum(counts.values())
    return counts
