"""Boxes and points as text: one codec for referring (regions in the question) and grounding
(regions in the answer).

Default convention (Ferret / Ferret-UI code, PAPERS.md section 3): integers on a 1000 x 1000 virtual
canvas relative to the original image, `x' = int(x * 1000 / W)` truncated and clamped to 0..999;
boxes `[x1, y1, x2, y2]`, points `[x, y]`. The system prompt states the convention.

    codec = BoxCodec()
    codec.encode([10, 20, 110, 220], image_size=(1170, 2532))   # '[8, 7, 94, 86]'
    codec.decode_boxes("it is at [8, 7, 94, 86]", (1170, 2532))  # [[9.36, 17.72, ...]]
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_NUMBER = r"-?\d+(?:\.\d+)?"
_BOX_TEXT = re.compile(rf"\[?\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]?")


@dataclass
class BoxCodec:
    """Region <-> text codec.

    Args:
        canvas: size of the virtual canvas (1000 in Ferret); coordinates become integers 0..canvas-1.
        point_ratio: probability that a referring region (user turn) is written as a point inside
            the element near its centre rather than a box (Ferret-UI: 0.5). Grounding answers are
            always boxes.
        system_prompt: stated to the model when a sample has regions; `{canvas}` is filled in.
    """

    canvas: int = 1000
    point_ratio: float = 0.5
    system_prompt: str = (
        "A chat between a human and an AI assistant. Coordinates are integers on a {canvas}x{canvas} "
        "canvas of the image. Point: [x, y]. Bounding box: [x1, y1, x2, y2]. Image size: {canvas}x{canvas}."
    )

    def to_canvas(self, value: float, extent: float) -> int:
        return min(max(int(value * self.canvas / extent), 0), self.canvas - 1)

    def from_canvas(self, value: float, extent: float) -> float:
        return float(value) * extent / self.canvas

    def encode(self, region: list[float], image_size: tuple[int, int]) -> str:
        """`[x1, y1, x2, y2]` or `[x, y]` in original pixels -> canvas text."""
        w, h = image_size
        coords = [self.to_canvas(v, w if k % 2 == 0 else h) for k, v in enumerate(region)]
        return "[" + ", ".join(str(c) for c in coords) + "]"

    def referring_region(self, box: list[float], rng: random.Random) -> list[float]:
        """The region a referring question shows: the box, or a point near its centre."""
        if len(box) != 4 or rng.random() >= self.point_ratio:
            return list(box)
        x1, y1, x2, y2 = box
        # Near the centre: within the middle half of the element, so the point is unambiguous.
        jx, jy = (x2 - x1) / 4, (y2 - y1) / 4
        return [(x1 + x2) / 2 + rng.uniform(-jx, jx), (y1 + y2) / 2 + rng.uniform(-jy, jy)]

    def decode_boxes(self, text: str, image_size: tuple[int, int]) -> list[list[float]]:
        """All boxes found in free text, mapped back to original pixels. Never raises."""
        w, h = image_size
        boxes = []
        for m in _BOX_TEXT.finditer(text or ""):
            v = [float(g) for g in m.groups()]
            boxes.append([self.from_canvas(v[0], w), self.from_canvas(v[1], h),
                          self.from_canvas(v[2], w), self.from_canvas(v[3], h)])
        return boxes

    def prompt(self) -> str:
        return self.system_prompt.format(canvas=self.canvas)
