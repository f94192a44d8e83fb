"""Ferret-UI data reader: the released JSON, exactly as published, as canonical `Sample`s.

A released file is a JSON list of records (docs/reference.md, section 5; `apple/ml-ferret`, `ferretui/`):

    {"id": 0, "image": "appstore_reminders.png", "image_h": 2532, "image_w": 1170,
     "conversations": [{"from": "human", "value": "<image>\\nWhat's the UI type of the widget <bbox_location0>?"},
                       {"from": "gpt", "value": "Button"}],
     "box_x1y1x2y2": [[[445, 524, 692, 632]], []],            # per turn; optional
     "masks": [[{"size": [2532, 1170], "counts": "..."}], []]}  # optional COCO RLE, same nesting

The i-th box of a turn replaces `<bbox_location{i}>` in that turn (the `Sample` convention, so boxes
pass through untouched, in original pixels). Eval files have the same schema without the answer
turn; read them with `require_answer=False` (an eval record's optional `label` becomes the answer).

* Task: inferred from the file name the way Ferret-UI's `train.py` does (first of `TASKS`, in that
  order, contained in the name); `task=` overrides. An unknown task is a configuration error.
* `meta` also carries what metrics and overlays need: `image_size` (the file's), `answer_boxes` (the
  last answer's boxes, original pixels), `query_boxes` (the questions' boxes), `task_kind`,
  `raw_id`. The screenshot is the sample's one `Media`; metrics and overlays read its path and size
  from the prediction record's `media` (`mm15.base.data.media.MediaLayout`).
* Turns: `conversations` as LLaVA writes them (`mm15.data_builders.llava.parse_conversation`).
* Platform (`meta["platform"]`, for the Ref-i / Ref-A / Grd-i / Grd-A averages): the record's own
  `platform` field if any, else `iphone`/`ios` or `android` in the file name or image path, else the
  `platform=` argument; Spotlight tasks (Rico screens) are Android. Otherwise `unknown`.
* Screenshot path: one leading outside `media_root` (`..`, absolute elsewhere) skips the record
  before any file is looked at (`mm15.base.data.sources.resolve_media_path`, the data module's check).
* Screenshot size: the file is the truth. Ferret-UI normalises boxes by the declared `image_w` /
  `image_h`, so when those disagree with the file the boxes are rescaled from the declared frame to
  the file's (`size_mismatch="rescale"`; or `"skip"` the record), and the disagreement is counted.
* Boxes: wrong number of coordinates, inverted or zero-area boxes, boxes entirely outside the
  screenshot and box/placeholder count mismatches skip the record with the reason; boxes partly
  outside are clipped to the screenshot as Ferret-UI's `regulate_box` does (counted).
  Screenshots with an aspect ratio beyond `max_aspect_ratio` (e.g. 1 x 10000) are skipped.

    source = FerretUISource("ferret_ui/ocr_iphone_train.json", media_root="ferret_ui/images")
    for item in source.read(): ...   # Sample or Skip
    source.counts                    # Counter: records, skipped, size_mismatch, clipped_boxes
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Literal

from PIL import Image

from mm15.base.data.sample import BOX_MARKER, Media, Sample, SampleError, Skip, Turn, region_problem
from mm15.base.data.sources import MediaEscape, load_json_file, resolve_media_path, samples_from_rows
from mm15.data_builders.llava import parse_conversation

log = logging.getLogger(__name__)

# Ferret-UI task -> kind, in the order Ferret-UI's train.py tests file names ("widget_listing"
# before "ocr", ...). Kinds: referring (box in the question), grounding (box in the answer),
# caption / tap (Spotlight), advanced.
TASKS: dict[str, str] = {
    "screen2words": "caption", "widgetcaptions": "caption", "taperception": "tap",
    "widget_listing": "grounding", "ocr": "referring", "find_text": "grounding",
    "icon_recognition": "referring", "find_icons": "grounding", "widget_classification": "referring",
    "find_widget": "grounding", "detailed_description": "advanced", "conversation_perception": "advanced",
    "conversation_interaction": "advanced", "function": "advanced",
}
SPOTLIGHT = ("screen2words", "widgetcaptions", "taperception")
PLATFORM_WORDS = {"iphone": "iphone", "ios": "iphone", "android": "android"}


def infer_task(file_name: str) -> str:
    """Ferret-UI's rule: the first task name (in `TASKS` order) contained in the file name."""
    name = Path(file_name).name.lower()
    for task in TASKS:
        if task in name:
            return task
    raise ValueError(f"{file_name}: cannot infer the Ferret-UI task from the file name; expected one of "
                     f"{', '.join(TASKS)} in the name, or pass task=")


def infer_platform(*texts: str) -> str | None:
    """`iphone` / `android` when a word of the file name or image path says so."""
    for text in texts:
        words = Path(str(text).lower()).as_posix().replace("-", "_").replace(".", "_").replace("/", "_").split("_")
        for word in words:
            if word in PLATFORM_WORDS:
                return PLATFORM_WORDS[word]
    return None


class FerretUISource:
    """Ferret-UI released JSON (a file, or a directory of `*.json` files) -> `Sample | Skip`.

    Args:
        path: a released `.json` file or a directory of them.
        media_root: directory the records' `image` paths are relative to (default: the file's dir).
        task: override the task inferred from each file name (must be one of `TASKS`).
        platform: platform when neither the record nor its paths name one.
        require_answer: False for eval files without the answer turn (prediction).
        size_mismatch: `rescale` boxes to the screenshot file's size, or `skip` such records.
        max_aspect_ratio: longer / shorter side above which a screenshot is skipped.
        keep_masks: keep the optional RLE `masks` in `meta["masks"]` (unused by MM1.5, which has no
            region sampler; off to save memory).
    """

    def __init__(self, path: str, media_root: str | None = None, task: str | None = None,
                 platform: str | None = None, require_answer: bool = True,
                 size_mismatch: Literal["rescale", "skip"] = "rescale", max_aspect_ratio: float = 20.0,
                 keep_masks: bool = False):
        self.path = str(path)
        root = Path(path) if Path(path).is_dir() else Path(path).parent
        self.media_root = str(media_root) if media_root is not None else str(root)
        if task is not None and task not in TASKS:
            raise ValueError(f"{path}: unknown Ferret-UI task {task!r}; expected one of {', '.join(TASKS)}")
        self.files = self._files()
        self.tasks = {f: task or infer_task(f) for f in self.files}  # fails early on an unknown task
        self.platform, self.require_answer = platform, require_answer
        self.size_mismatch, self.max_aspect_ratio, self.keep_masks = size_mismatch, max_aspect_ratio, keep_masks
        self.counts: Counter = Counter()
        self._sizes: dict[str, tuple[int, int]] = {}

    def _files(self) -> list[str]:
        path = Path(self.path)
        if path.is_dir():
            files = sorted(str(p) for p in path.glob("*.json"))
            if not files:
                raise ValueError(f"{path}: no Ferret-UI *.json files in this directory")
            return files
        if not path.is_file():
            raise FileNotFoundError(f"Ferret-UI file not found: {path}")
        return [str(path)]

    def read(self) -> Iterator[Sample | Skip]:
        self.counts.clear()
        for file in self.files:
            yield from self._read_file(file)
        if self.counts["size_mismatch"] or self.counts["clipped_boxes"] or self.counts["skipped"]:
            log.warning("%s: %s", self.path, dict(self.counts))

    def _read_file(self, file: str) -> Iterator[Sample | Skip]:
        rows = load_json_file(file)
        if not isinstance(rows, list):
            raise ValueError(f"{file}: a Ferret-UI file is a JSON list of records, got {type(rows).__name__}")
        labelled = ((f"#{index}", row) for index, row in enumerate(rows))
        for item in samples_from_rows(labelled, file, partial(self.parse, file=file), self.require_answer):
            self.counts["records"] += 1
            self.counts["skipped"] += isinstance(item, Skip)
            yield item

    def parse(self, row: Any, label: str, file: str) -> Sample:
        """One released record (`label`: `#<index>` in its file) -> a validated `Sample`; raises
        `SampleError` naming the record."""
        raw_id = row.get("id", label) if isinstance(row, dict) else label
        err = partial(SampleError, raw_id, file)
        if not isinstance(row, dict):
            raise err(f"expected a JSON object, got {type(row).__name__}")
        image = row.get("image")
        if not isinstance(image, str) or not image:
            raise err("missing 'image' (the screenshot path)")
        turns = _turns(row, err)
        width, height, scale = self._screen(row, image, err)
        for k, turn in enumerate(turns):
            turn.boxes = [_checked_box(b, scale, width, height, err, k, self.counts) for b in turn.boxes]
        task = self.tasks[file]
        if not any(t.role == "assistant" for t in turns) and isinstance(row.get("label"), str):
            turns.append(Turn("assistant", row["label"]))
        answer = [t for t in turns if t.role == "assistant"]
        meta = {"raw_id": raw_id, "platform": self._platform(row, file, image, task), "task_kind": TASKS[task],
                "image_size": [width, height], "answer_boxes": answer[-1].boxes if answer else [],
                "query_boxes": [b for t in turns if t.role == "user" for b in t.boxes]}
        if self.keep_masks and "masks" in row:
            meta["masks"] = row["masks"]
        sample = Sample(f"{Path(file).stem}:{raw_id}", turns, [Media(image)], task, file, meta)
        try:
            return sample.validate(self.require_answer)
        except SampleError as e:
            raise err(e.reason) from None

    def _platform(self, row: dict, file: str, image: str, task: str) -> str:
        own = str(row.get("platform", "")).lower()
        found = PLATFORM_WORDS.get(own) or infer_platform(Path(file).name, image) or self.platform
        return found or ("android" if task in SPOTLIGHT else "unknown")

    def _screen(self, row: dict, image: str, err) -> tuple[int, int, tuple[float, float]]:
        """(width, height) of the screenshot file and the declared-to-file box scale."""
        width, height = self._file_size(image, err)
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            raise err(f"screenshot {image} is {width}x{height}: aspect ratio beyond {self.max_aspect_ratio:g}:1")
        declared = (row.get("image_w"), row.get("image_h"))
        if declared == (width, height) or not all(isinstance(v, (int, float)) and v > 0 for v in declared):
            return width, height, (1.0, 1.0)
        self.counts["size_mismatch"] += 1
        if self.size_mismatch == "skip":
            raise err(f"image_w x image_h {declared[0]}x{declared[1]} disagrees with the file ({width}x{height})")
        return width, height, (width / declared[0], height / declared[1])

    def _file_size(self, image: str, err) -> tuple[int, int]:
        try:  # before any file-system call: a record must not make us stat or open files outside the root
            full = Path(resolve_media_path(image, self.media_root))
        except MediaEscape as e:
            raise err(str(e)) from None
        if str(full) not in self._sizes:
            if not full.is_file():
                raise err(f"screenshot not found: {full}")
            try:
                with Image.open(full) as im:  # reads the header only
                    self._sizes[str(full)] = im.size
            except Exception as e:  # PIL raises many types on corrupt files
                raise err(f"screenshot {full} cannot be opened ({type(e).__name__}: {e})") from None
        return self._sizes[str(full)]


def _turns(row: dict, err) -> list[Turn]:
    """`conversations` + per-turn `box_x1y1x2y2` -> turns with raw boxes (checked later)."""
    turns = parse_conversation(row, err, num_media=1)  # Ferret-UI puts `<image>` first in the first question
    per_turn = row.get("box_x1y1x2y2") or []
    if not isinstance(per_turn, list) or any(not isinstance(b, list) for b in per_turn):
        raise err("'box_x1y1x2y2' must be a list with one list of boxes per turn")
    if len(per_turn) > len(turns) and any(per_turn[len(turns):]):
        raise err(f"'box_x1y1x2y2' has boxes for {len(per_turn)} turns but there are {len(turns)} turns")
    for k, turn in enumerate(turns):
        boxes = per_turn[k] if k < len(per_turn) else []
        markers = len(set(BOX_MARKER.findall(turn.text)))
        if markers != len(boxes):
            raise err(f"turn {k}: {len(boxes)} boxes for {markers} <bbox_location> placeholders")
        turn.boxes = list(boxes)
    return turns


def _checked_box(box: Any, scale: tuple[float, float], width: int, height: int, err, turn: int,
                 counts: Counter) -> list[float]:
    """Validate one `[x1, y1, x2, y2]` (`region_problem`, the check of every source), map it to the
    file's frame and clip it to the screenshot (Ferret-UI's `regulate_box`)."""
    problem = region_problem(box, points=False)
    if problem:
        raise err(f"turn {turn}: box {box!r} {problem}")
    x1, y1, x2, y2 = box[0] * scale[0], box[1] * scale[1], box[2] * scale[0], box[3] * scale[1]
    clipped = [min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise err(f"turn {turn}: box {box!r} lies outside the {width}x{height} screenshot")
    if clipped != [x1, y1, x2, y2]:
        counts["clipped_boxes"] += 1
    return clipped
