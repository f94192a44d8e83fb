"""The one canonical sample type every data builder produces and every processor consumes.

A `Sample` is a conversation (`turns`) plus the media it refers to (`media`). Data builders in
`mm15.data_builders` turn rows of public datasets into `Sample`s and know nothing about tokens;
processors in `mm15.base.data.processor` (and the variant processors) turn a `Sample` into tensors and
know nothing about dataset file formats.

Conventions
-----------
* Media markers: each `<image>` in a turn's text stands for the next item of `Sample.media`, in
  order over the whole conversation (a video is one item too and also uses `<image>`; its frames are
  expanded by the video processor). The number of markers must equal `len(media)`.
* Regions: `Turn.boxes[i]` replaces the marker `<bbox_location{i}>` in that turn's text (Ferret-UI's
  convention). A region is `[x1, y1, x2, y2]` (box) or `[x, y]` (point) in pixels of the original
  first image of the sample. How it becomes text (canvas, rounding, box vs point for referring) is
  the processor's business (`mm15.base.data.boxes.BoxCodec`), never the builder's. Arity, numbers
  and orientation are checked by `Sample.validate` (`region_problem`), the range on the image by
  the processor once the image is read (`region_outside`), for every source.
* Labels: `IGNORE_INDEX` marks the positions of a tokenised sample that carry no target (prompt,
  media placeholders, padding); the processor writes it and the model's loss skips it.
* `task` names the task for per-task metrics; `meta` carries free information a metric may need
  (`choices`, `num_choices`, `platform`, `answer_aliases`, ...). `source` is the file the record
  came from, so every error can name it.

Canonical JSONL: one `Sample.to_dict()` per line (see `Sample.from_dict` for the accepted keys).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100  # PyTorch's cross-entropy default `ignore_index`
ROLES = ("system", "user", "assistant")
BOX_MARKER = re.compile(r"<bbox_location(\d+)>")

MediaKind = Literal["image", "video"]


def region_problem(region: Any, points: bool = True) -> str | None:
    """What is wrong with one region (`[x1, y1, x2, y2]`, or `[x, y]` when `points`), or None:
    arity, finite numeric coordinates, orientation (x2 > x1, y2 > y1). The one check every source
    with regions goes through (`Sample.validate`; the Ferret-UI reader before its rescaling)."""
    arities = (4, 2) if points else (4,)
    if not isinstance(region, (list, tuple)) or len(region) not in arities:
        n = len(region) if isinstance(region, (list, tuple)) else f"not a list of ({type(region).__name__})"
        return f"has {n} coordinates, expected [x1, y1, x2, y2]" + (" or [x, y]" if points else "")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in region):
        return "has non-numeric coordinates"
    if len(region) == 4 and (region[2] < region[0] or region[3] < region[1]):
        return "is inverted (x2 < x1 or y2 < y1)"
    if len(region) == 4 and (region[2] == region[0] or region[3] == region[1]):
        return "has zero area"
    return None


def region_outside(region: list[float], size: tuple[int, int]) -> bool:
    """Whether a (checked) region leaves the `size` (width, height) image it is given in."""
    w, h = size
    return any(not 0 <= v <= (w if k % 2 == 0 else h) for k, v in enumerate(region))


class SampleError(ValueError):
    """A record that cannot be used, with the record id, the file it came from and why."""

    def __init__(self, record_id: str, source: str, reason: str):
        self.record_id = str(record_id)
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{source or '<memory>'}: record {record_id!r}: {reason}")

    def as_skip(self, stage: str) -> "Skip":
        return Skip(record_id=self.record_id, source=self.source, reason=self.reason, stage=stage)


@dataclass
class Skip:
    """A recorded skip: written to the run's quarantine file and counted against the error budget."""

    record_id: str
    source: str
    reason: str
    stage: str = "parse"  # parse | load | tokenize


@dataclass
class Media:
    """One image or video. `path` is relative to the data module's media root (or absolute inside it)."""

    path: str
    kind: MediaKind = "image"
    start: float | None = None  # clip window in seconds (videos only)
    end: float | None = None
    data: bytes | None = None  # the file's bytes, for images embedded in prepared shards (`path` names them)


@dataclass
class Turn:
    role: str
    text: str
    boxes: list[list[float]] = field(default_factory=list)


@dataclass
class Sample:
    id: str
    turns: list[Turn]
    media: list[Media] = field(default_factory=list)
    task: str = "default"
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str | None:
        """Text of the last assistant turn (the reference answer at evaluation time)."""
        for turn in reversed(self.turns):
            if turn.role == "assistant":
                return turn.text
        return None

    def error(self, reason: str) -> SampleError:
        return SampleError(self.id, self.source, reason)

    def validate(self, require_answer: bool = True) -> "Sample":
        """Check the structural contract; raise `SampleError` naming the record on violation."""
        if not self.turns:
            raise self.error("no turns")
        for k, turn in enumerate(self.turns):
            if turn.role not in ROLES:
                raise self.error(f"turn {k}: unknown role {turn.role!r} (expected one of {ROLES})")
            if not isinstance(turn.text, str):
                raise self.error(f"turn {k}: text is {type(turn.text).__name__}, not a string")
            markers = [int(m) for m in BOX_MARKER.findall(turn.text)]
            if sorted(set(markers)) != list(range(len(turn.boxes))):
                raise self.error(
                    f"turn {k}: {len(turn.boxes)} boxes but region markers {sorted(set(markers))}"
                )
            for i, box in enumerate(turn.boxes):
                problem = region_problem(box)
                if problem:
                    raise self.error(f"turn {k}: region {i} {box!r} {problem}")
        if require_answer and self.answer is None:
            raise self.error("no assistant turn")
        n_markers = sum(t.text.count(IMAGE_TOKEN) for t in self.turns)
        if n_markers != len(self.media):
            raise self.error(f"{n_markers} {IMAGE_TOKEN} markers but {len(self.media)} media items")
        for k, m in enumerate(self.media):
            if m.kind not in ("image", "video"):
                raise self.error(f"unknown media kind {m.kind!r}")
            if not isinstance(m.path, str) or not m.path:  # an int or a list would crash path joining later
                what = "empty" if m.path == "" else f"{type(m.path).__name__}, not a string"
                raise self.error(f"media item {k}: media path {m.path!r} is {what}")
        return self

    def prompt_only(self) -> "Sample":
        """The sample without its final assistant turn: what the model sees when generating."""
        last = max(i for i, t in enumerate(self.turns) if t.role == "assistant")
        return Sample(self.id, self.turns[:last], self.media, self.task, self.source, self.meta)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any], source: str = "") -> "Sample":
        """Build from a canonical JSONL row; raises `SampleError` on malformed rows."""
        record_id = str(row.get("id", "?")) if isinstance(row, dict) else "?"
        try:
            turns = [Turn(role=t["role"], text=t["text"], boxes=list(t.get("boxes") or [])) for t in row["turns"]]
            media = [Media(**m) if isinstance(m, dict) else Media(path=m) for m in row.get("media") or []]
            return cls(
                id=str(row["id"]),
                turns=turns,
                media=media,
                task=str(row.get("task") or "default"),
                source=source or row.get("source", ""),
                meta=dict(row.get("meta") or {}),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise SampleError(record_id, source, f"malformed canonical record ({type(e).__name__}: {e})") from e
