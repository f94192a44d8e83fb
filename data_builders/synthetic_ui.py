"""A learnable synthetic UI dataset in the Ferret-UI layout, read back through `FerretUISource`.

Screens are drawn on a grid of cells (portrait phones 64x128 with 2x4 cells, landscape 128x64
with 4x2 cells by default); each cell is empty or holds one widget, jittered inside it: a button
(accent-coloured, a word in white), a text field (white, grey border), an icon (a small coloured
square or disc) or a label (a word in dark text). Words use a 3x5 pixel font, so reading them
needs the resolution that dynamic splitting gives. Two platforms, `iphone` and `android`, differ
in palette and are written to separate files, so Ref-i / Ref-A / Grd-i / Grd-A are all populated.

Tasks, one record per screen and task when it applies, with Ferret-UI's names and phrasing:
    widget_classification  "What's the UI type of the widget <bbox_location0>?" -> "Button"
    ocr                    "What text is displayed in the element <bbox_location0>?" -> "Next"
    find_text              'Where is the text "Next" located?' -> "<bbox_location0>"
    find_widget            "Where is the text field located?" -> "<bbox_location0>"
Chance for widget classification is 1/4, for OCR 1/len(WORDS).

    source = SyntheticUISource("data/ui", split="train", num_screens=600)
    source.prepare()    # idempotent: writes data/ui/images/*.png and data/ui/train/<task>_<platform>_train.json
    samples = list(source.read())
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

from mm15.base.sample import Sample, Skip

from .ferret_ui import FerretUISource

WORDS = ("Back", "Next", "Done", "Edit", "Save", "Home", "Menu", "OK")
WIDGETS = ("Button", "Text field", "Icon", "Label")
PLATFORMS = ("iphone", "android")
TASK_NAMES = ("widget_classification", "ocr", "find_text", "find_widget")
SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2, "predict": 3}

PALETTES = {  # background, button, text-field border, icon, label text
    "iphone": ((242, 242, 247), (0, 122, 255), (160, 160, 168), (255, 149, 0), (28, 28, 30)),
    "android": ((250, 250, 250), (98, 0, 238), (110, 110, 110), (3, 180, 160), (40, 40, 40)),
}

# 3x5 pixel glyphs for the letters of WORDS, rows top to bottom.
GLYPHS = {
    "A": ("010", "101", "111", "101", "101"), "B": ("110", "101", "110", "101", "110"),
    "C": ("011", "100", "100", "100", "011"), "D": ("110", "101", "101", "101", "110"),
    "E": ("111", "100", "110", "100", "111"), "H": ("101", "101", "111", "101", "101"),
    "I": ("111", "010", "010", "010", "111"), "K": ("101", "110", "100", "110", "101"),
    "M": ("101", "111", "111", "101", "101"), "N": ("110", "101", "101", "101", "101"),
    "O": ("010", "101", "101", "101", "010"), "S": ("011", "100", "010", "001", "110"),
    "T": ("111", "010", "010", "010", "010"), "U": ("101", "101", "101", "101", "111"),
    "V": ("101", "101", "101", "101", "010"), "X": ("101", "101", "010", "101", "101"),
}


@dataclass
class Widget:
    kind: str  # one of WIDGETS
    box: list[int]  # [x1, y1, x2, y2], pixels
    word: str | None = None


@dataclass
class ScreenSpec:
    """Screen geometry: sizes are (width, height); cells are (columns, rows)."""

    portrait: tuple[int, int] = (64, 128)
    portrait_cells: tuple[int, int] = (2, 4)
    landscape: tuple[int, int] = (128, 64)
    landscape_cells: tuple[int, int] = (4, 2)
    landscape_ratio: float = 0.3
    fill: float = 0.7  # probability that a cell holds a widget


def text_width(word: str) -> int:
    return 4 * len(word) - 1


def draw_text(draw: ImageDraw.ImageDraw, x: int, y: int, word: str, color: tuple[int, int, int]) -> None:
    for k, letter in enumerate(word.upper()):
        for row, bits in enumerate(GLYPHS[letter]):
            for col, bit in enumerate(bits):
                if bit == "1":
                    draw.point((x + 4 * k + col, y + row), fill=color)


def widget_size(kind: str, word: str | None, rng: random.Random, cell: tuple[int, int]) -> tuple[int, int]:
    cw, ch = cell
    if kind == "Button":
        return min(text_width(word) + rng.randint(6, 10), cw - 2), rng.randint(9, 12)
    if kind == "Text field":
        return cw - rng.randint(3, 8), rng.randint(7, 10)
    if kind == "Icon":
        side = rng.randint(6, 9)
        return side, side
    return text_width(word) + 2, 7  # Label: the word plus a 1 px margin


def place_widget(kind: str, cell_box: tuple[int, int, int, int], rng: random.Random) -> Widget:
    x0, y0, x1, y1 = cell_box
    word = rng.choice(WORDS) if kind in ("Button", "Label") else None
    w, h = widget_size(kind, word, rng, (x1 - x0, y1 - y0))
    x = rng.randint(x0 + 1, max(x0 + 1, x1 - w - 1))
    y = rng.randint(y0 + 1, max(y0 + 1, y1 - h - 1))
    return Widget(kind, [x, y, x + w, y + h], word)


def draw_widget(draw: ImageDraw.ImageDraw, widget: Widget, palette: tuple) -> None:
    _, button, border, icon, label = palette
    x1, y1, x2, y2 = widget.box
    if widget.kind == "Button":
        draw.rounded_rectangle([x1, y1, x2 - 1, y2 - 1], radius=3, fill=button)
        draw_text(draw, (x1 + x2 - text_width(widget.word)) // 2, (y1 + y2 - 5) // 2, widget.word, (255, 255, 255))
    elif widget.kind == "Text field":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=(255, 255, 255), outline=border)
    elif widget.kind == "Icon":
        shape = draw.ellipse if (x1 + y1) % 2 else draw.rectangle
        shape([x1, y1, x2 - 1, y2 - 1], fill=icon)
    else:
        draw_text(draw, x1 + 1, y1 + 1, widget.word, label)


def make_screen(rng: random.Random, platform: str, spec: ScreenSpec) -> tuple[Image.Image, list[Widget]]:
    """One screenshot and its widgets (each cell empty or holding one widget)."""
    landscape = rng.random() < spec.landscape_ratio
    (w, h), (cols, rows) = (spec.landscape, spec.landscape_cells) if landscape else (spec.portrait, spec.portrait_cells)
    palette = PALETTES[platform]
    image = Image.new("RGB", (w, h), palette[0])
    draw = ImageDraw.Draw(image)
    widgets = []
    for r in range(rows):
        for c in range(cols):
            if rng.random() < spec.fill:
                cell = (c * w // cols, r * h // rows, (c + 1) * w // cols, (r + 1) * h // rows)
                widgets.append(place_widget(rng.choice(WIDGETS), cell, rng))
                draw_widget(draw, widgets[-1], palette)
    return image, widgets


def screen_records(image: str, size: tuple[int, int], widgets: list[Widget], rng: random.Random) -> dict[str, dict]:
    """Ferret-UI records for one screen, keyed by task (tasks that do not apply are left out)."""
    def record(question: str, answer: str, question_boxes: list, answer_boxes: list) -> dict:
        return {"id": Path(image).stem, "image": image, "image_h": size[1], "image_w": size[0],
                "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}],
                "box_x1y1x2y2": [question_boxes, answer_boxes]}

    out = {}
    if widgets:
        target = rng.choice(widgets)
        out["widget_classification"] = record("What's the UI type of the widget <bbox_location0>?", target.kind,
                                              [target.box], [])
    worded = [w for w in widgets if w.word]
    if worded:
        target = rng.choice(worded)
        out["ocr"] = record("What text is displayed in the element <bbox_location0>?", target.word, [target.box], [])
    unique_words = [w for w in worded if sum(o.word == w.word for o in worded) == 1]
    if unique_words:
        target = rng.choice(unique_words)
        out["find_text"] = record(f'Where is the text "{target.word}" located?', "<bbox_location0>", [], [target.box])
    unique_kinds = [w for w in widgets if sum(o.kind == w.kind for o in widgets) == 1]
    if unique_kinds:
        target = rng.choice(unique_kinds)
        out["find_widget"] = record(f"Where is the {target.kind.lower()} located?", "<bbox_location0>", [], [target.box])
    return out


class SyntheticUISource:
    """Generates (`prepare`) and reads (`read`, through `FerretUISource`) one split.

    Args:
        root: dataset directory; images in `root/images`, JSON in `root/<split>/`.
        split: `train`, `val`, `test` or `predict` (different seeds, same generator).
        num_screens: screenshots in this split (each gives up to one record per task).
        seed: base seed; the split offsets it.
        tasks: subset of TASK_NAMES to write.
        screen: geometry (see `ScreenSpec`).
    """

    def __init__(self, root: str, split: str = "train", num_screens: int = 600, seed: int = 0,
                 tasks: list[str] | None = None, screen: ScreenSpec | None = None):
        self.root, self.split, self.num_screens, self.seed = Path(root), split, num_screens, seed
        self.tasks = list(tasks or TASK_NAMES)
        unknown = set(self.tasks) - set(TASK_NAMES)
        if unknown or split not in SPLIT_OFFSET:
            raise ValueError(f"SyntheticUISource: unknown tasks {sorted(unknown)} or split {split!r}")
        self.screen = screen or ScreenSpec()
        self.media_root = str(self.root)

    @property
    def split_dir(self) -> Path:
        return self.root / self.split

    def manifest(self) -> dict:
        return {"num_screens": self.num_screens, "seed": self.seed, "tasks": self.tasks, "screen": asdict(self.screen),
                "version": 1}

    def prepare(self) -> None:
        """Write the split unless the same one is already there."""
        manifest = self.split_dir / "MANIFEST"  # JSON, named so the reader's *.json glob skips it
        if manifest.is_file() and json.loads(manifest.read_text()) == json.loads(json.dumps(self.manifest())):
            return
        rng = random.Random(self.seed * 1_000_003 + SPLIT_OFFSET[self.split])
        files: dict[str, list[dict]] = {f"{t}_{p}_{self.split}.json": [] for t in self.tasks for p in PLATFORMS}
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self.split_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.num_screens):
            platform = PLATFORMS[i % 2]
            image, widgets = make_screen(rng, platform, self.screen)
            name = f"images/{self.split}_{i:05d}.png"
            image.save(self.root / name)
            for task, rec in screen_records(name, image.size, widgets, rng).items():
                if task in self.tasks:
                    files[f"{task}_{platform}_{self.split}.json"].append(rec)
        for file, records in files.items():
            (self.split_dir / file).write_text(json.dumps(records, indent=1))
        manifest.write_text(json.dumps(self.manifest()))

    def read(self) -> Iterator[Sample | Skip]:
        if not (self.split_dir / "MANIFEST").is_file():
            self.prepare()
        return FerretUISource(str(self.split_dir), media_root=self.media_root).read()
