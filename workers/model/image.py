"""Frame preprocessing for the vision encoder: MiniCPM-V resize and slicing (MODEL.md §4 Prefill step 3).

A frame becomes a list of normalised tensors [3, h, w]: the *source* image first, then the HD slices
row-major. Every side is a multiple of the patch size (14), so each image is an h/14 × w/14 patch grid.

Resize rule (scale_resolution S = 448): keep the aspect ratio r = width/height, set
height = int(S / sqrt(r)), width = int(height * r), then round both to a multiple of 14. With
`max_slice_nums` N > 1 and an image larger than S², a grid of `cols × rows` slices is chosen: the
candidate slice counts are ceil(area / S²) - 1, itself and + 1 (capped at N, never 1), every
factorisation of each count is a candidate grid, and the grid whose log aspect ratio is nearest the
image's wins. The image is resized so each slice again has ≈ S² area, then cut into the grid.

Shape buckets (DESIGN.md §5, MODEL.md §8): the sizes above depend only on the aspect ratio (and, for
slices, on the image area), so one camera always yields the same shapes. To keep the set of compiled
vision shapes small across cameras, an aspect ratio within 3 % (in log ratio) of 1:1, 4:3, 3:4, 16:9 or
9:16 is snapped to it before planning (at most a 3 % stretch). With max_slice_nums 1 every such frame
maps to one of five patch grids (h × w): 32×32, 28×37, 37×28, 24×43, 43×24 — `common_source_grids()`
lists them for warm-up. Other aspect ratios follow the exact rule (a new shape compiles once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from workers.model.presets import VisionArgs

COMMON_ASPECTS: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)
ASPECT_SNAP_TOLERANCE = 0.03  # |log(r) - log(common r)| below this snaps to the common ratio
NORM_MEAN = 0.5
NORM_STD = 0.5


@dataclass(frozen=True)
class SlicePlan:
    """Target sizes for one frame: the source image and, when sliced, the refined image and its grid."""

    source_size: tuple[int, int]  # (width, height) in pixels
    refine_size: tuple[int, int] | None  # (width, height) of the image that is cut into slices
    grid: tuple[int, int] | None  # (cols, rows)


def _round_to_multiple(length: float, multiple: int) -> int:
    return max(round(length / multiple) * multiple, multiple)


def _best_resize(size: tuple[float, float], scale: int, patch: int, allow_upscale: bool) -> tuple[int, int]:
    """(width, height) ≈ scale² in area with the same aspect ratio, both multiples of `patch`."""
    width, height = size
    if width * height > scale * scale or allow_upscale:
        ratio = width / height
        height = int(scale / math.sqrt(ratio))
        width = int(height * ratio)
    return _round_to_multiple(width, patch), _round_to_multiple(height, patch)


def _refine_size(size: tuple[float, float], grid: tuple[int, int], scale: int, patch: int) -> tuple[int, int]:
    """Size of the image to cut into `grid` so that every slice is a best-resized patch-aligned image."""
    width, height = size
    cols, rows = grid
    slice_width = _round_to_multiple(width, cols) / cols
    slice_height = _round_to_multiple(height, rows) / rows
    best_width, best_height = _best_resize((slice_width, slice_height), scale, patch, allow_upscale=True)
    return best_width * cols, best_height * rows


def _snapped_size(width: int, height: int) -> tuple[float, float]:
    """The frame size with its aspect ratio snapped to a common one when within tolerance (same area)."""
    log_ratio = math.log(width / height)
    nearest = min(COMMON_ASPECTS, key=lambda r: abs(math.log(r) - log_ratio))
    if abs(math.log(nearest) - log_ratio) > ASPECT_SNAP_TOLERANCE:
        return float(width), float(height)
    area = width * height
    return math.sqrt(area * nearest), math.sqrt(area / nearest)


def plan_slices(width: int, height: int, max_slice_nums: int, args: VisionArgs) -> SlicePlan:
    """Sizes the MiniCPM-V rule picks for a width × height frame (after aspect snapping)."""
    scale, patch = args.image_size, args.patch
    size = _snapped_size(width, height)
    area_ratio = size[0] * size[1] / (scale * scale)
    multiple = min(math.ceil(area_ratio), max_slice_nums)
    if multiple <= 1:
        return SlicePlan(_best_resize(size, scale, patch, allow_upscale=True), None, None)

    source_size = _best_resize(size, scale, patch, allow_upscale=False)
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    grids = [(cols, n // cols) for n in counts for cols in range(1, n + 1) if n % cols == 0]
    log_ratio = math.log(size[0] / size[1])
    grid = min(grids, key=lambda g: abs(log_ratio - math.log(g[0] / g[1])))  # first best wins ties
    return SlicePlan(source_size, _refine_size(size, grid, scale, patch), grid)


def _to_tensor(img: Image.Image) -> Tensor:
    """uint8 RGB image -> float32 [3, h, w] normalised with mean 0.5 / std 0.5.

    numpy, not torch, does the arithmetic: slicing runs on the engine's frame thread, where torch ops
    would start a second intra-op thread team competing with the model's (measured on the 2-core CPU).
    """
    array = (np.asarray(img, dtype=np.float32) / 255.0 - NORM_MEAN) / NORM_STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def slice_count(img: Image.Image, max_slice_nums: int, args: VisionArgs) -> int:
    """How many images `slice_image` makes of `img` (the source plus the grid's slices), without resizing."""
    plan = plan_slices(img.width, img.height, max(max_slice_nums, 1), args)
    return 1 + (plan.grid[0] * plan.grid[1] if plan.grid is not None else 0)


def slice_image(img: Image.Image, max_slice_nums: int, args: VisionArgs) -> list[Tensor]:
    """Source image then slices (row-major) as normalised float32 tensors [3, h, w], sides multiples of 14."""
    if max_slice_nums < 1:
        raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
    rgb = img.convert("RGB")
    plan = plan_slices(rgb.width, rgb.height, max_slice_nums, args)
    images = [_to_tensor(rgb.resize(plan.source_size, Image.Resampling.BICUBIC))]
    if plan.grid is not None and plan.refine_size is not None:
        refined = rgb.resize(plan.refine_size, Image.Resampling.BICUBIC)
        cols, rows = plan.grid
        slice_width, slice_height = plan.refine_size[0] // cols, plan.refine_size[1] // rows
        for row in range(rows):
            for col in range(cols):
                box = (col * slice_width, row * slice_height, (col + 1) * slice_width, (row + 1) * slice_height)
                images.append(_to_tensor(refined.crop(box)))
    return images


def patch_grid(image: Tensor, args: VisionArgs) -> tuple[int, int]:
    """(rows, cols) of patches of a preprocessed image [3, h, w] (the resampler's tgt_hw)."""
    return image.shape[-2] // args.patch, image.shape[-1] // args.patch


def common_source_grids(args: VisionArgs) -> list[tuple[int, int]]:
    """Patch grids (rows, cols) of source images for the common aspect ratios: the shapes to warm up."""
    grids = []
    for ratio in COMMON_ASPECTS:
        width, height = _best_resize((ratio, 1.0), args.image_size, args.patch, allow_upscale=True)
        grids.append((height // args.patch, width // args.patch))
    return grids
