"""A learnable synthetic UI dataset in the Ferret-UI layout, read back through `FerretUISource`.

Screens are drawn on a grid of cells (portrait phones 64x128 as a list of 4 rows, landscape 128x64
as 2x2 cells by default); cells hold one widget each (`ScreenSpec.widgets`, all four by default): a
button (accent-coloured, a word in white), a text field (white, dark border), an icon (a small
coloured square or disc) or a label (a word in light text). A widget's bounds are sized from its cell
alone, never from its kind or word, and kinds and words do not repeat on a screen
(`ScreenSpec.distinct`): neither the referring box nor "name anything on the screen" gives the
answer away, so referring has to look at the region. Words use a 3x5 pixel font (2x when it fits)
and differ in length. Two platforms, `iphone` and `android`, differ in palette and are written to
separate files, so Ref-i / Ref-A / Grd-i / Grd-A are all populated.

Tasks, one record per screen and task when it applies, with Ferret-UI's names and phrasing:
    widget_classification  "What's the UI type of the widget <bbox_location0>?" -> "Button"
    ocr                    "What text is displayed in the element <bbox_location0>?" -> "Back"
    find_text              'Where is the text "Back" located?' -> "<bbox_location0>"
    find_widget            "Where is the text field located?" -> "<bbox_location0>"
    widget_listing         "List all the widgets on the screen with their locations."
                           -> "Button <bbox_location0>, Icon <bbox_location1>, ..." (reading order)
Chance for widget classification is 1/4, for OCR 1/len(WORDS). `read` adds `meta["on_screen_answers"]`
to referring samples (the kinds / words the screen shows, from `<split>/SCREENS`), so the metrics can
report the on-screen baseline: on the default distinct screens only the button and the label carry a
word, so naming either word scores 1/2 on OCR without looking at the referred region. Grounding samples
get `meta["on_screen_boxes"]` (every widget's box): answering with one of them at random is the layout
prior, 1/4 on a four-widget screen, far above the average box.

    source = SyntheticUISource("data/ui", split="train", num_screens=600)
    source.prepare()    # writes data/ui/images/*.png and data/ui/train/<task>_<platform>_train.json, once
                        # per set of parameters (`data/ui/train.params.json`)
    samples = list(source.read())
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

from mm15.base.data.sample import Sample, Skip
from mm15.base.data.sources import build_once

from .ferret_ui import TASKS, FerretUISource

# Words of different lengths: their extent is a cue a tiny model can read at 32 px crops.
WORDS = ("OK", "Add", "Back", "Cancel")
WIDGETS = ("Button", "Text field", "Icon", "Label")
PLATFORMS = ("iphone", "android")
TASK_NAMES = ("widget_classification", "ocr", "find_text", "find_widget", "widget_listing")
SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2, "predict": 3}

# Dark grey themes: a background near the vision encoder's mean colour normalises to ~0, so a tiny
# random-init model sees the widgets, not the background (light themes did not learn in the demo budget).
PALETTES = {  # background, button, text-field border, icon, label text
    "iphone": ((112, 112, 120), (0, 122, 255), (30, 30, 30), (255, 149, 0), (250, 250, 250)),
    "android": ((104, 110, 104), (150, 60, 255), (20, 20, 20), (3, 220, 190), (255, 255, 235)),
}

# 3x5 pixel glyphs for the letters of WORDS, rows top to bottom.
GLYPHS = {
    "A": ("010", "101", "111", "101", "101"), "B": ("110", "101", "110", "101", "110"),
    "C": ("011", "100", "100", "100", "011"), "D": ("110", "101", "101", "101", "110"),
    "E": ("111", "100", "110", "100", "111"), "F": ("111", "100", "110", "100", "100"),
    "H": ("101", "101", "111", "101", "101"), "L": ("100", "100", "100", "100", "111"),
    "I": ("111", "010", "010", "010", "111"), "K": ("101", "110", "100", "110", "101"),
    "M": ("101", "111", "111", "101", "101"), "N": ("110", "101", "101", "101", "101"),
    "O": ("010", "101", "101", "101", "010"), "R": ("110", "101", "110", "101", "101"),
    "S": ("011", "100", "010", "001", "110"),
    "T": ("111", "010", "010", "010", "010"), "U": ("101", "101", "101", "101", "111"),
    "V": ("101", "101", "101", "101", "010"), "X": ("101", "101", "010", "101", "101"),
}


@dataclass
class Widget:
    kind: str  # one of WIDGETS
    box: list[int]  # [x1, y1, x2, y2], pixels
    word: str | None = None
    font: int = 1  # pixels per glyph dot


@dataclass
class ScreenSpec:
    """Screen geometry: sizes are (width, height); cells are (columns, rows). Widget bounds are a
    fixed fraction of their cell; what is drawn inside (an icon glyph, 3x5-pixel words) stays small."""

    portrait: tuple[int, int] = (64, 128)
    portrait_cells: tuple[int, int] = (1, 4)  # a list: one widget per row
    landscape: tuple[int, int] = (128, 64)
    landscape_cells: tuple[int, int] = (2, 2)
    landscape_ratio: float = 0.3
    widgets: tuple[int, int] = (4, 4)  # widgets per screen (min, max), each in its own cell
    # Kinds and words without repetition on a screen (while there are enough): naming any widget or
    # word present is then no better than chance, so referring has to read the region.
    distinct: bool = True
    box_size: tuple[float, float] = (0.8, 0.55)  # a widget's bounds as a fraction of its cell (w, h)
    jitter: int = 1  # px a widget's size and centre may vary


def text_width(word: str, font: int = 1) -> int:
    return (4 * len(word) - 1) * font


def draw_text(draw: ImageDraw.ImageDraw, x: int, y: int, word: str, color: tuple[int, int, int], font: int = 1) -> None:
    for k, letter in enumerate(word.upper()):
        for row, bits in enumerate(GLYPHS[letter]):
            for col, bit in enumerate(bits):
                if bit == "1":
                    left, top = x + (4 * k + col) * font, y + row * font
                    draw.rectangle([left, top, left + font - 1, top + font - 1], fill=color)


def place_widget(kind: str, word: str | None, cell_box: tuple[int, int, int, int], rng: random.Random,
                 spec: ScreenSpec) -> Widget:
    """A widget in its cell: the box (the element's bounds) is sized from the cell alone, whatever the
    kind or word, so a referring box never gives the answer away; up to `spec.jitter` px off centre."""
    x0, y0, x1, y1 = cell_box
    cw, ch = x1 - x0, y1 - y0
    w = min(int(spec.box_size[0] * cw) + rng.randint(-spec.jitter, spec.jitter), cw - 2)
    h = min(int(spec.box_size[1] * ch) + rng.randint(-spec.jitter, spec.jitter), ch - 2)
    x = min(max((x0 + x1 - w) // 2 + rng.randint(-spec.jitter, spec.jitter), x0 + 1), x1 - w - 1)
    y = min(max((y0 + y1 - h) // 2 + rng.randint(-spec.jitter, spec.jitter), y0 + 1), y1 - h - 1)
    font = 2 if word and text_width(word, 2) + 4 <= w and 5 * 2 + 4 <= h else 1
    return Widget(kind, [x, y, x + w, y + h], word, font)


def draw_widget(draw: ImageDraw.ImageDraw, widget: Widget, palette: tuple) -> None:
    """Button: accent fill, white word centred. Text field: white with a dark border. Icon: a small
    disc or square centred in its bounds. Label: the word, left-aligned, no background."""
    _, button, border, icon, label = palette
    x1, y1, x2, y2 = widget.box
    if widget.kind == "Button":
        draw.rounded_rectangle([x1, y1, x2 - 1, y2 - 1], radius=3, fill=button)
        tx, ty = (x1 + x2 - text_width(widget.word, widget.font)) // 2, (y1 + y2 - 5 * widget.font) // 2
        draw_text(draw, tx, ty, widget.word, (255, 255, 255), widget.font)
    elif widget.kind == "Text field":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=(255, 255, 255), outline=border)
    elif widget.kind == "Icon":
        side = max(3, min(x2 - x1, y2 - y1) - 4)
        cx, cy = (x1 + x2 - side) // 2, (y1 + y2 - side) // 2
        shape = draw.ellipse if (x1 + y1) % 2 else draw.rectangle
        shape([cx, cy, cx + side - 1, cy + side - 1], fill=icon)
    else:
        draw_text(draw, x1 + 2, (y1 + y2 - 5 * widget.font) // 2, widget.word, label, widget.font)


class _Draw:
    """Random choices from `items`; with `distinct`, without repetition until all have been drawn."""

    def __init__(self, items: tuple[str, ...], rng: random.Random, distinct: bool):
        self.items, self.rng, self.distinct, self.pool = items, rng, distinct, []

    def next(self) -> str:
        if not self.distinct:
            return self.rng.choice(self.items)
        if not self.pool:
            self.pool = list(self.items)
            self.rng.shuffle(self.pool)
        return self.pool.pop()


def make_screen(rng: random.Random, platform: str, spec: ScreenSpec) -> tuple[Image.Image, list[Widget]]:
    """One screenshot and its widgets (a few cells, in reading order, hold one widget each)."""
    landscape = rng.random() < spec.landscape_ratio
    (w, h), (cols, rows) = (spec.landscape, spec.landscape_cells) if landscape else (spec.portrait, spec.portrait_cells)
    palette = PALETTES[platform]
    image = Image.new("RGB", (w, h), palette[0])
    draw = ImageDraw.Draw(image)
    count = min(rng.randint(*spec.widgets), cols * rows)
    cells = sorted(rng.sample(range(cols * rows), count))  # reading order
    kinds, words = _Draw(WIDGETS, rng, spec.distinct), _Draw(WORDS, rng, spec.distinct)
    widgets = []
    for k in cells:
        r, c = divmod(k, cols)
        cell = (c * w // cols, r * h // rows, (c + 1) * w // cols, (r + 1) * h // rows)
        kind = kinds.next()
        widgets.append(place_widget(kind, words.next() if kind in ("Button", "Label") else None, cell, rng, spec))
        draw_widget(draw, widgets[-1], palette)
    return image, widgets


QUESTIONS = {  # task -> (question, answer) for one widget; referring tasks put the box in the question
    "widget_classification": lambda w: ("What's the UI type of the widget <bbox_location0>?", w.kind),
    "ocr": lambda w: ("What text is displayed in the element <bbox_location0>?", w.word),
    "find_text": lambda w: (f'Where is the text "{w.word}" located?', "<bbox_location0>"),
    "find_widget": lambda w: (f"Where is the {w.kind.lower()} located?", "<bbox_location0>"),
}


# Referring tasks: their answers for every candidate widget of a screen give the on-screen baseline
# (`meta["on_screen_answers"]`): naming any of them at random, no referring needed.
REFERRING = ("widget_classification", "ocr")


def candidates(task: str, widgets: list[Widget]) -> list[Widget]:
    """The widgets a question of `task` can be about (grounding targets must be unique on the screen)."""
    worded = [w for w in widgets if w.word]
    if task == "widget_classification":
        return widgets
    if task == "ocr":
        return worded
    if task == "find_text":
        return [w for w in worded if sum(o.word == w.word for o in worded) == 1]
    return [w for w in widgets if sum(o.kind == w.kind for o in widgets) == 1]


def conversation(image: str, size: tuple[int, int], qa: list[tuple[str, str, list, list]]) -> dict:
    """A Ferret-UI record: turns of (question, answer, question boxes, answer boxes)."""
    turns, boxes = [], []
    for k, (question, answer, q_boxes, a_boxes) in enumerate(qa):
        turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + question}, {"from": "gpt", "value": answer}]
        boxes += [q_boxes, a_boxes]
    return {"id": Path(image).stem, "image": image, "image_h": size[1], "image_w": size[0],
            "conversations": turns, "box_x1y1x2y2": boxes}


def screen_records(image: str, size: tuple[int, int], widgets: list[Widget], rng: random.Random,
                   questions: int = 1) -> dict[str, dict]:
    """Ferret-UI records for one screen, keyed by task (tasks that do not apply are left out); up to
    `questions` question/answer turns per record, about different widgets."""
    out = {}
    for task, ask in QUESTIONS.items():
        targets = candidates(task, widgets)
        rng.shuffle(targets)
        qa = []
        for w in targets[:questions]:
            question, answer = ask(w)
            referring = "<bbox_location0>" in question
            qa.append((question, answer, [w.box] if referring else [], [] if referring else [w.box]))
        if qa:
            out[task] = conversation(image, size, qa)
    if widgets:
        listing = ", ".join(f"{w.kind} <bbox_location{k}>" for k, w in enumerate(widgets))
        question = "List all the widgets on the screen with their locations."
        out["widget_listing"] = conversation(image, size, [(question, listing, [], [w.box for w in widgets])])
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
        questions: question/answer turns per record (about different widgets of the screen); more than
            one gives more supervision per screenshot in training, test splits keep 1.
    """

    def __init__(self, root: str, split: str = "train", num_screens: int = 600, seed: int = 0,
                 tasks: list[str] | None = None, screen: ScreenSpec | None = None, questions: int = 1):
        self.root, self.split, self.num_screens, self.seed = Path(root), split, num_screens, seed
        self.tasks = list(tasks or TASK_NAMES)
        unknown = set(self.tasks) - set(TASK_NAMES)
        if unknown or split not in SPLIT_OFFSET:
            raise ValueError(f"SyntheticUISource: unknown tasks {sorted(unknown)} or split {split!r}")
        self.screen = screen or ScreenSpec()
        self.questions = questions
        self.media_root = str(self.root)

    @property
    def split_dir(self) -> Path:
        return self.root / self.split

    def params(self) -> dict:
        return {"num_screens": self.num_screens, "seed": self.seed, "tasks": self.tasks, "screen": asdict(self.screen),
                "questions": self.questions, "words": list(WORDS), "version": 5}

    def prepare(self) -> None:
        """Write the split unless it is there with the same parameters (`<root>/<split>.params.json`,
        outside the split folder the reader globs)."""
        build_once(self.root, self.split, self.params(), self._build)

    def _build(self) -> None:
        rng = random.Random(self.seed * 1_000_003 + SPLIT_OFFSET[self.split])
        files: dict[str, list[dict]] = {f"{t}_{p}_{self.split}.json": [] for t in self.tasks for p in PLATFORMS}
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self.split_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.split_dir.glob("*.json"):  # files of tasks no longer asked for
            stale.unlink()
        screens = {}
        for i in range(self.num_screens):
            platform = PLATFORMS[i % 2]
            image, widgets = make_screen(rng, platform, self.screen)
            name = f"images/{self.split}_{i:05d}.png"
            image.save(self.root / name)
            screens[name] = {t: sorted({QUESTIONS[t](w)[1] for w in candidates(t, widgets)}) for t in REFERRING}
            screens[name]["boxes"] = [w.box for w in widgets]
            for task, rec in screen_records(name, image.size, widgets, rng, self.questions).items():
                if task in self.tasks:
                    files[f"{task}_{platform}_{self.split}.json"].append(rec)
        for file, records in files.items():
            (self.split_dir / file).write_text(json.dumps(records, indent=1))
        (self.split_dir / "SCREENS").write_text(json.dumps(screens))

    def read(self) -> Iterator[Sample | Skip]:
        self.prepare()
        on_screen = self.split_dir / "SCREENS"  # written with the split (absent in copies made by hand)
        screens = json.loads(on_screen.read_text()) if on_screen.is_file() else {}
        for sample in FerretUISource(str(self.split_dir), media_root=self.media_root).read():
            if isinstance(sample, Sample) and sample.media[0].path in screens:
                shown = screens[sample.media[0].path]
                if sample.task in REFERRING:
                    sample.meta["on_screen_answers"] = shown[sample.task]
                elif TASKS.get(sample.task) == "grounding":  # the layout prior (metrics: one asked-for box)
                    sample.meta["on_screen_boxes"] = shown["boxes"]
            yield sample
