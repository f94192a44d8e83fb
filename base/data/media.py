"""What every media item shares: the encoder's colour statistics, how pixels are fitted into a
crop, and the `MediaLayout` record that says how the item lies in a processed sample.

Fitting (one rule for image splitting and video frames, one setting `resize`):

* `pad` (default): resize keeping the aspect ratio until the image fills the canvas on one side,
  place it top-left and fill the right/bottom margins with the encoder's mean colour;
* `stretch`: resize to the canvas, aspect not kept (Ferret-UI's anyres).

    fit_into(rgb, (336, 336), "pad", MEAN_COLOR)   # (336, 336, 3) uint8
    fit_size(1170, 2532, (672, 672), "pad")        # (311, 672)

The layout travels with the item: the processor writes one per media item (`item["layouts"]`),
`collate` keeps them per sample (`batch["layouts"]`), variants read them to reshape features
(SlowFast pooling) and the test/predict records carry them as dicts under `media`:

    layout = item["layouts"][0]       # MediaLayout(kind="image", crops=3, placeholders=[144] * 3,
                                      #             grid=(1, 2), source_size=(1170, 540), ...)
    record_layouts(record)[0].source_size
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from mm15.base.data.sample import MediaKind

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The mean in 0..255, truncated as LLaVA's `expand2square` does: (122, 116, 104).
MEAN_COLOR = (int(255 * CLIP_MEAN[0]), int(255 * CLIP_MEAN[1]), int(255 * CLIP_MEAN[2]))

ResizeMode = Literal["pad", "stretch"]


# ----- fitting pixels into a canvas ---------------------------------------------------------------
def fit_size(width: int, height: int, canvas: tuple[int, int], resize: ResizeMode = "pad") -> tuple[int, int]:
    """(w, h) a `width` x `height` image takes inside `canvas` (w, h): as large as fits with the
    aspect kept (`pad`), or the canvas itself (`stretch`)."""
    if resize == "stretch":
        return canvas[0], canvas[1]
    scale = min(canvas[0] / width, canvas[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) or (N, H, W, 3) uint8 -> the same at `size` (w, h): area interpolation when
    shrinking, bicubic when enlarging."""
    h, w = pixels.shape[-3:-1]
    if (w, h) == tuple(size):
        return pixels
    interp = cv2.INTER_AREA if size[0] < w else cv2.INTER_CUBIC
    if pixels.ndim == 3:
        return cv2.resize(pixels, tuple(size), interpolation=interp)
    return np.stack([cv2.resize(p, tuple(size), interpolation=interp) for p in pixels])


def pad_to(pixels: np.ndarray, canvas: tuple[int, int], color: tuple[int, int, int]) -> np.ndarray:
    """(..., h, w, 3) uint8 with h, w within `canvas` (W, H) -> (..., H, W, 3): the pixels top-left,
    the right and bottom margins in `color`."""
    h, w = pixels.shape[-3:-1]
    width, height = canvas
    if (w, h) == (width, height):
        return pixels
    if w > width or h > height:
        raise ValueError(f"pixels of {w}x{h} do not fit a {width}x{height} canvas")
    out = np.empty(pixels.shape[:-3] + (height, width, 3), dtype=np.uint8)
    out[..., :h, :w, :] = pixels
    out[..., h:, :, :] = color  # only the margins are written: video frames pass here in the loader
    out[..., :h, w:, :] = color
    return out


def fit_into(image: np.ndarray, canvas: tuple[int, int], resize: ResizeMode, color: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (canvas h, canvas w, 3): resized by `fit_size`, then padded by `pad_to`."""
    size = fit_size(image.shape[1], image.shape[0], canvas, resize)
    return pad_to(resize_pixels(image, size), canvas, color)


# ----- the layout record ----------------------------------------------------------------------------
@dataclass
class MediaLayout:
    """How one media item lies in a processed sample.

    Args:
        kind: `image` or `video`.
        path: the file (or frame folder) it was read from, as the data module resolved it.
        crops: how many rows of `pixel_values` it put there (crops of an image, frames of a
            video), consecutive, in the order of the sample's media.
        placeholders: placeholder tokens behind each `<image>` marker of its text, in order: one
            marker of `tokens_per_crop` per crop or frame, or a variant's own counts (SlowFast: slow,
            fast).
        source_size: (width, height) of the original image or of the video as displayed.
        grid: (n_h, n_w) of a split image; None for one crop or for a video.
        backend: the decoder that served a video (`decord`, `pyav`, `frames`).
        notes: what the decoder noted on the way (fallback, clamped window, repeated frames, ...).
        frame_indices, timestamps: the source frame and its time in seconds, per frame of a video.
        replaced_frames: chosen frames of a video the decoder could not decode, shown as the nearest
            decoded frame (counted by the video module; past `DecodeSpec.max_replaced_fraction` the
            sample is skipped instead).
    """

    kind: MediaKind
    path: str
    crops: int
    placeholders: list[int]
    source_size: tuple[int, int]
    grid: tuple[int, int] | None = None
    backend: str | None = None
    notes: list[str] = field(default_factory=list)
    frame_indices: list[int] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    replaced_frames: int = 0

    @property
    def num_placeholders(self) -> int:
        return sum(self.placeholders)

    def describe(self) -> str:
        """`image of 3 crops -> [4, 4, 4]`: for error messages."""
        return f"{self.kind} of {self.crops} crops -> {self.placeholders}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MediaLayout":
        grid = data.get("grid")
        return cls(**{**data, "source_size": tuple(data["source_size"]), "grid": None if grid is None else tuple(grid)})


def record_layouts(record: dict[str, Any]) -> list[MediaLayout]:
    """The layouts of a test/predict record's media (`record["media"]`), first media item first."""
    return [MediaLayout.from_dict(m) for m in record.get("media") or []]
