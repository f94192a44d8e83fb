"""Boxes and points as text: one codec for referring (regions in the question) and grounding
(regions in the answer).

Default convention (Ferret / Ferret-UI code, docs/reference.md, section 3): integers on a 1000 x 1000 virtual
canvas relative to the original image, `x' = int(x * 1000 / W)` truncated and clamped to 0..999;
boxes `[x1, y1, x2, y2]`, points `[x, y]`. The system prompt states the convention. Decoding maps a
canvas value back with `x = x' * W / 1000` (Ferret's inverse), so a round trip loses at most one
canvas cell (W / 1000 pixels).

    codec = BoxCodec()
    codec.encode([10, 20, 110, 220], image_size=(1170, 2532))   # '[8, 7, 94, 86]'
    codec.decode_boxes("it is at [8, 7, 94, 86]", (1170, 2532))  # [[9.36, 17.72, 109.98, 217.75]]

Parsing is tolerant: any run of numbers separated only by spaces, commas or semicolons is a
candidate (brackets optional); a run of 4k numbers gives k boxes, a run of 2 a point. Coordinates
are clamped to the canvas and box corners sorted. Text without regions, or garbage, gives `[]`.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Literal

Region = list[float]  # [x1, y1, x2, y2] (box) or [x, y] (point), in pixels of the original image

# A run: numbers separated only by blanks, commas or semicolons. Brackets and words end a run.
_RUN = re.compile(r"-?\d+(?:\.\d+)?(?:[\s,;]+-?\d+(?:\.\d+)?)*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class BoxCodec:
    """Region <-> text codec.

    Args:
        canvas: size of the virtual canvas (1000 in Ferret); coordinates become integers 0..canvas-1.
        rounding: `truncate` (Ferret: `int(x * canvas / W)`) or `round` to the nearest cell.
        point_ratio: probability that a referring region (user turn) is written as a point inside
            the element near its centre rather than a box (Ferret-UI: 0.5). Grounding answers are
            always boxes.
        point_spread: standard deviation of the point around the box centre, as a fraction of the
            box size (Ferret-UI's `get_obj_center`: 0.15); the point is kept inside the box.
        system_prompt: stated to the model when a sample has regions; `{canvas}` is filled in.
    """

    canvas: int = 1000
    rounding: Literal["truncate", "round"] = "truncate"
    point_ratio: float = 0.5
    point_spread: float = 0.15
    system_prompt: str = (
        "A chat between a human and an AI assistant. Coordinates are integers on a {canvas}x{canvas} "
        "canvas of the image. Point: [x, y]. Bounding box: [x1, y1, x2, y2]. Image size: {canvas}x{canvas}."
    )

    def __post_init__(self) -> None:
        if self.canvas < 2:
            raise ValueError(f"BoxCodec.canvas must be at least 2, got {self.canvas}")
        if not 0.0 <= self.point_ratio <= 1.0:
            raise ValueError(f"BoxCodec.point_ratio must be in [0, 1], got {self.point_ratio}")

    def to_canvas(self, value: float, extent: float) -> int:
        scaled = value * self.canvas / extent
        cell = int(scaled) if self.rounding == "truncate" else int(round(scaled))
        return min(max(cell, 0), self.canvas - 1)

    def from_canvas(self, value: float, extent: float) -> float:
        return float(value) * extent / self.canvas

    def encode(self, region: Region, image_size: tuple[int, int]) -> str:
        """`[x1, y1, x2, y2]` or `[x, y]` in original pixels -> canvas text. Raises ValueError."""
        w, h = _checked_size(image_size)
        if len(region) not in (2, 4):
            raise ValueError(f"a region has 4 (box) or 2 (point) coordinates, got {len(region)}: {region!r}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in region):
            raise ValueError(f"region coordinates must be finite numbers, got {region!r}")
        coords = [self.to_canvas(v, w if k % 2 == 0 else h) for k, v in enumerate(region)]
        return "[" + ", ".join(str(c) for c in coords) + "]"

    def referring_region(self, box: Region, rng: random.Random) -> Region:
        """The region a referring question shows: the box, or (with `point_ratio`) a point near its centre."""
        if len(box) != 4 or rng.random() >= self.point_ratio:
            return list(box)
        x1, y1, x2, y2 = box
        x = rng.gauss((x1 + x2) / 2, self.point_spread * (x2 - x1))
        y = rng.gauss((y1 + y2) / 2, self.point_spread * (y2 - y1))
        # Kept inside the element, so the point never refers to a neighbour.
        return [min(max(x, x1), x2), min(max(y, y1), y2)]

    def decode_regions(self, text: str, image_size: tuple[int, int]) -> list[Region]:
        """All boxes and points in free text, in original pixels, in reading order. Never raises."""
        try:
            w, h = _checked_size(image_size)
        except ValueError:
            return []
        regions = []
        for run in _RUN.findall(text if isinstance(text, str) else ""):
            values = [float(v) for v in _NUMBER.findall(run)]
            for chunk in _chunks(values):
                regions.append(self._to_pixels(chunk, w, h))
        return regions

    def decode_boxes(self, text: str, image_size: tuple[int, int]) -> list[Region]:
        """All boxes found in free text, mapped back to original pixels. Never raises."""
        return [r for r in self.decode_regions(text, image_size) if len(r) == 4]

    def decode_points(self, text: str, image_size: tuple[int, int]) -> list[Region]:
        """All points (`[x, y]`) found in free text, in original pixels. Never raises."""
        return [r for r in self.decode_regions(text, image_size) if len(r) == 2]

    def prompt(self) -> str:
        return self.system_prompt.format(canvas=self.canvas)

    def _to_pixels(self, chunk: list[float], w: int, h: int) -> Region:
        top = self.canvas - 1
        clamped = [min(max(v, 0.0), top) for v in chunk]
        pixels = [self.from_canvas(v, w if k % 2 == 0 else h) for k, v in enumerate(clamped)]
        if len(pixels) == 4:  # corners may come inverted from a model: sort them
            x1, x2 = sorted((pixels[0], pixels[2]))
            y1, y2 = sorted((pixels[1], pixels[3]))
            pixels = [x1, y1, x2, y2]
        return pixels


def _chunks(values: list[float]) -> list[list[float]]:
    """A run of numbers -> regions: 4k numbers are k boxes, exactly 2 a point, anything else none
    (a lone number such as "3 buttons" is not a region)."""
    if len(values) == 2:
        return [values]
    return [values[i:i + 4] for i in range(0, len(values) - len(values) % 4, 4)]


def _checked_size(image_size: tuple[int, int]) -> tuple[int, int]:
    try:
        w, h = image_size
        ok = w > 0 and h > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"image_size must be (width, height) with both > 0, got {image_size!r}")
    return w, h
