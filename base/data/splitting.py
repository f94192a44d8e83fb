"""MM1.5 dynamic high-resolution image splitting (docs/reference.md, section 2), plus the variants used for
ablations and for Ferret-UI.

An image becomes a list of r x r crops: the grid crops in row-major order, then the overview (the
whole image at r x r). The grid (n_h, n_w) is chosen among all grids with
n_min <= n_h * n_w <= n_max:

* `select="mm15"` (default): if some grid holds the image without downscaling, take the one with
  the least padding (grid area minus the area of the image resized, aspect kept, until its longer
  side fills the grid); otherwise the grid with the least downscaling. Ties: fewer crops [choice].
* `select="llava_next"` (Ferret-UI's released code): maximum effective resolution, then least waste.

Resize then pad (right/bottom, with the encoder's mean colour) [choice]; `resize="stretch"` is
Ferret-UI's behaviour. Both are `mm15.base.data.media.fit_into`, the rule video frames follow too. `overview="first"` is Ferret-UI's order; MM1.5 puts it last.

    spec = SplitSpec(crop_size=672, grid_min=4, grid_max=9)
    plan = plan_split(width=1170, height=2532, spec=spec)   # SplitPlan(grid=(3, 2), ...)
    crops = split_image(rgb_uint8_hwc, spec)                 # list of (r, r, 3) uint8 arrays
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mm15.base.data.media import MEAN_COLOR, ResizeMode, fit_into, fit_size, pad_to, resize_pixels

SplitMode = Literal["dynamic", "static", "none"]


@dataclass
class SplitSpec:
    """How images become crops.

    Args:
        crop_size: r, the side of every crop and of the overview (MM1.5: 672).
        mode: `dynamic` (MM1.5 grids), `static` (2x2 + overview, the ablation baseline) or `none`
            (each image one crop; also what video frames use).
        grid_min, grid_max: n_min, n_max. Training (4, 9); inference may widen n_max to 16 but
            must keep n_min (lowering it only at test time collapsed grounding in MM1.5).
        grids: explicit list of (n_h, n_w) grids overriding (grid_min, grid_max); Ferret-UI anyres
            is [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]].
        select: grid selection rule, `mm15` or `llava_next` (see module docstring).
        resize: `pad` (resize keeping aspect, pad right/bottom) or `stretch` (the setting video
            decoding shares, `mm15.video.decoding.DecodeSpec.resize`).
        overview: `last` (MM1.5), `first` (Ferret-UI) or `none`.
        max_images_to_split: samples with more images than this are not split (MM1.5: 3 or more
            images -> one crop each).
    """

    crop_size: int = 672
    mode: SplitMode = "dynamic"
    grid_min: int = 4
    grid_max: int = 9
    grids: list[tuple[int, int]] | None = None
    select: Literal["mm15", "llava_next"] = "mm15"
    resize: ResizeMode = "pad"
    overview: Literal["last", "first", "none"] = "last"
    max_images_to_split: int = 2
    pad_color: tuple[int, int, int] = MEAN_COLOR


@dataclass
class SplitPlan:
    grid: tuple[int, int]  # (n_h, n_w); (1, 1) with has_grid False means "one crop only"
    resized: tuple[int, int]  # (width, height) of the image inside the grid canvas
    has_grid: bool = True
    overview: str = "last"
    crop_order: list[tuple[int, int]] = field(default_factory=list)  # 1-based (row, col); (0, 0) overview

    @property
    def num_crops(self) -> int:
        return len(self.crop_order)


def candidate_grids(grid_min: int, grid_max: int) -> list[tuple[int, int]]:
    """All (n_h, n_w) with grid_min <= n_h * n_w <= grid_max, fewer crops first."""
    grids = [(h, w) for n in range(grid_min, grid_max + 1) for h in range(1, n + 1) for w in [n // h] if h * w == n]
    return grids


def _fit_scale(width: int, height: int, grid: tuple[int, int], r: int) -> float:
    n_h, n_w = grid
    return min(n_w * r / width, n_h * r / height)


def select_grid(width: int, height: int, grids: list[tuple[int, int]], r: int,
                rule: Literal["mm15", "llava_next"] = "mm15") -> tuple[int, int]:
    """Pick the grid for a `width` x `height` image under `rule` (see module docstring)."""
    if rule == "llava_next":
        return _select_llava_next(width, height, grids, r)
    scored = []
    for grid in grids:
        s = _fit_scale(width, height, grid, r)
        canvas = grid[0] * grid[1] * r * r
        padding = canvas - max(1, round(width * s)) * max(1, round(height * s))  # integer pixels: no float ties
        # Grids that need no downscaling come first (least padding); the others by least downscaling.
        key = (0, padding, grid[0] * grid[1]) if s >= 1.0 else (1, -s, grid[0] * grid[1])
        scored.append((key, grid))
    return min(scored)[1]


def _select_llava_next(width: int, height: int, grids: list[tuple[int, int]], r: int) -> tuple[int, int]:
    """LLaVA-NeXT's rule: maximise the effective resolution, then minimise wasted canvas."""
    best, best_key = grids[0], None
    for grid in grids:
        s = _fit_scale(width, height, grid, r)
        eff = min(int(width * s) * int(height * s), width * height)
        waste = grid[0] * grid[1] * r * r - eff
        key = (-eff, waste)
        if best_key is None or key < best_key:
            best, best_key = grid, key
    return best


def plan_split(width: int, height: int, spec: SplitSpec, split: bool = True) -> SplitPlan:
    """Decide grid, resized size and crop order for one image; `split=False` forces one crop."""
    r = spec.crop_size
    if not split or spec.mode == "none":
        return SplitPlan((1, 1), fit_size(width, height, (r, r), spec.resize), False, "none", [(0, 0)])
    if spec.mode == "static":
        grid = (2, 2)
    else:
        grids = [tuple(g) for g in spec.grids] if spec.grids else candidate_grids(spec.grid_min, spec.grid_max)
        grid = select_grid(width, height, grids, r, spec.select)
    order = [(i, j) for i in range(1, grid[0] + 1) for j in range(1, grid[1] + 1)]
    if spec.overview == "last":
        order = order + [(0, 0)]
    elif spec.overview == "first":
        order = [(0, 0)] + order
    resized = fit_size(width, height, (grid[1] * r, grid[0] * r), spec.resize)
    return SplitPlan(grid, resized, True, spec.overview, order)


def overview_crop(image: np.ndarray, spec: SplitSpec) -> np.ndarray:
    """The whole image as one r x r crop (resized keeping aspect and padded, or stretched)."""
    return fit_into(image, (spec.crop_size, spec.crop_size), spec.resize, spec.pad_color)


def split_image(image: np.ndarray, spec: SplitSpec, split: bool = True) -> tuple[list[np.ndarray], SplitPlan]:
    """(H, W, 3) uint8 image -> crops in `plan.crop_order`, each (r, r, 3) uint8."""
    h, w = image.shape[:2]
    plan = plan_split(w, h, spec, split)
    r = spec.crop_size
    if not plan.has_grid:
        return [overview_crop(image, spec)], plan
    n_h, n_w = plan.grid
    canvas = pad_to(resize_pixels(image, plan.resized), (n_w * r, n_h * r), spec.pad_color)  # (n_h*r, n_w*r, 3)
    overview = overview_crop(image, spec) if plan.overview != "none" else None
    crops = [overview if i == 0 else canvas[(i - 1) * r: i * r, (j - 1) * r: j * r] for i, j in plan.crop_order]
    return crops, plan
