"""A learnable synthetic image task: one drawn shape per image; questions about its colour, its
position (image quadrant) or its shape.

The answer needs the pixels (the text never reveals it). Images vary in size and aspect ratio so
dynamic splitting is exercised. Splits use different seeds, so held-out images are new.

    source = SyntheticShapesSource("data/shapes", split="train", num_samples=2000)
    source.prepare()            # writes data/shapes/train.jsonl and data/shapes/train/*.png, once per
                                # set of parameters (`mm15.base.data.sources.build_once`)
    samples = list(source.read())

Chance level: 1/6 for colour, 1/4 for position and shape (`meta["num_choices"]`). Colour and
position are the demo's questions: a tiny random-init model learns them in a few CPU minutes; shape
needs far more training at 32-px crops and is there for longer runs.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from mm15.base.data.sample import IMAGE_TOKEN, Media, Sample, Skip, Turn
from mm15.base.data.sources import JsonlSource, generated_jsonl

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
           "yellow": (235, 215, 20), "purple": (150, 40, 190), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = {"colour": "What colour is the shape? Answer with one word.",
             "shape": "What shape is drawn? Answer with one word.",
             "position": "In which quarter of the image is the shape?"}
CHOICES = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS)}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def draw_shape(canvas: np.ndarray, shape: str, colour: tuple[int, int, int], cx: int, cy: int, r: int) -> None:
    if shape == "circle":
        cv2.circle(canvas, (cx, cy), r, colour, -1)
    elif shape == "square":
        cv2.rectangle(canvas, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
    elif shape == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(canvas, [pts], colour)
    else:  # cross
        t = max(1, r // 3)
        cv2.rectangle(canvas, (cx - r, cy - t), (cx + r, cy + t), colour, -1)
        cv2.rectangle(canvas, (cx - t, cy - r), (cx + t, cy + r), colour, -1)


def make_image(rng: random.Random, min_side: int, max_side: int) -> tuple[np.ndarray, dict[str, str]]:
    """A grey canvas with one shape entirely inside one quadrant; returns the image and its answers."""
    w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    canvas = np.full((h, w, 3), rng.randint(200, 250), np.uint8)
    colour, shape, position = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randrange(4)
    m = min(w, h)
    r = rng.randint(max(3, m // 7), max(4, m // 4 - 2))  # as large as a quadrant allows: colour must be visible
    x0, y0 = (position % 2) * (w // 2), (position // 2) * (h // 2)  # quadrant's top-left corner
    cx, cy = rng.randint(x0 + r, x0 + w // 2 - r - 1), rng.randint(y0 + r, y0 + h // 2 - r - 1)
    draw_shape(canvas, shape, COLOURS[colour], cx, cy, r)
    return canvas, {"colour": colour, "shape": shape, "position": POSITIONS[position]}


def question_sample(split: str, n: int, question: str, answer: str, choices: list[str], media: Media,
                    task: str) -> Sample:
    """Item `n` of a generated split: one question about one media item, answered by one of `choices`."""
    return Sample(f"{split}-{n:05d}", [Turn("user", question), Turn("assistant", answer)], [media], task=task,
                  meta={"num_choices": len(choices), "choices": choices})


def build_split(root: Path, split: str, num_samples: int, seed: int, questions: list[str],
                min_side: int, max_side: int) -> list[Sample]:
    rng = random.Random(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    samples = []
    for n in range(num_samples):
        image, answers = make_image(rng, min_side, max_side)
        rel = f"{split}/{n:05d}.png"
        cv2.imwrite(str(root / rel), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        task = questions[n % len(questions)]
        samples.append(question_sample(split, n, f"{IMAGE_TOKEN}\n{QUESTIONS[task]}", answers[task], CHOICES[task],
                                       Media(rel), task))
    return samples


class SyntheticShapesSource:
    """The shapes task as a source: `<root>/<split>.jsonl` and `<root>/<split>/*.png`, generated once
    per set of parameters (`mm15.base.data.sources.generated_jsonl`).

    Args:
        root: output folder.
        split: train | val | test (different seeds, so held-out images are unseen).
        num_samples: images in this split.
        questions: which question types to ask, cycled (`colour`, `position`, `shape`).
        min_side, max_side: image sides in pixels (random per image, so aspect ratios vary).
        seed: overrides the split's seed.
    """

    def __init__(self, root: str, split: str = "train", num_samples: int = 1000,
                 questions: list[str] = ["colour", "position"], min_side: int = 48, max_side: int = 96,
                 seed: int | None = None):
        self.root = Path(root)
        self.split = split
        self.num_samples = num_samples
        self.questions = list(questions)
        self.min_side, self.max_side = min_side, max_side
        self.seed = SPLIT_SEEDS.get(split, 3) if seed is None else seed
        self.media_root = str(self.root)

    def params(self) -> dict:
        return {"num_samples": self.num_samples, "seed": self.seed, "questions": self.questions,
                "min_side": self.min_side, "max_side": self.max_side}

    def prepare(self) -> JsonlSource:
        """Generate the split unless it exists with the same parameters; the source that reads it."""
        return generated_jsonl(self.root, self.split, self.params(), lambda: build_split(
            self.root, self.split, self.num_samples, self.seed, self.questions, self.min_side, self.max_side))

    def read(self) -> Iterator[Sample | Skip]:
        yield from self.prepare().read()
