"""Contact sheets: the sampled frames of a test video as the model saw them, with its question, the
reference answer and the prediction, for a seeded sample of test videos.

During `mm15 test`, `FrameCapture` keeps the uint8 frames the processor produced (before the module
normalises them) for a seeded uniform sample of up to N video items (reservoir sampling, so the
sample does not depend on how many batches there are) and the prompt decoded from `input_ids`.
After the test `save_contact_sheets` joins them with the prediction records and writes one PNG per
video under `<run dir>/contact_sheets/`; `mm15.base.training.plots.log_images` adds them to
TensorBoard. Frames are tiled in reading order, each labelled with its index and time in the clip;
small frames are enlarged (nearest neighbour) to stay readable.

    capture = FrameCapture(limit=8)
    capture.add(batch, processor)                    # every test batch, before normalisation
    paths = save_contact_sheets(capture.items, records, "runs/video_demo/contact_sheets")
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mm15.base.data.media import MediaLayout

MIN_TILE = 96  # enlarge frames whose shorter side is below this
MAX_COLUMNS = 6
PAD, LABEL_H, LINE_H = 4, 12, 13
MIN_WIDTH = 360
BACKGROUND, TEXT = (255, 255, 255), (0, 0, 0)


def media_layouts(batch: dict[str, Any]) -> list[list[MediaLayout]]:
    """Per sample of the batch, the layouts of its media items in crop order (the one place that reads them)."""
    return batch.get("layouts", [])


@dataclass
class CapturedVideo:
    """One test video as the model saw it."""

    id: str
    task: str
    frames: np.ndarray  # (n, h, w, 3) uint8
    prompt: str
    frame_indices: list[int]
    timestamps: list[float]


def prompt_text(input_ids: Any, attention_mask: Any, tokenizer: Any, image_token_id: int) -> str:
    """One sample's (T,) prompt without padding, media placeholders and special tokens, on one line."""
    ids = [int(i) for i, keep in zip(input_ids, attention_mask) if keep and int(i) != image_token_id]
    return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())


class FrameCapture:
    """A seeded uniform sample of up to `limit` test videos (reservoir sampling over all batches)."""

    def __init__(self, limit: int, seed: int = 0):
        self.limit = limit
        self.rng = random.Random(seed)
        self.seen = 0
        self.items: list[CapturedVideo] = []

    def _slot(self) -> int | None:
        """Where the next video goes: appended while there is room, then replaces a random one or none."""
        self.seen += 1
        if len(self.items) < self.limit:
            return len(self.items)
        k = self.rng.randrange(self.seen)
        return k if k < self.limit else None

    def add(self, batch: dict[str, Any], processor: Any) -> None:
        """Keep this batch's chosen videos; `pixel_values` must still be the processor's uint8 crops."""
        if not self.limit or not batch.get("size"):
            return
        pixels, start = batch["pixel_values"], 0  # (C, 3, r, r) uint8, the crops of all samples in order
        for row, layouts in enumerate(media_layouts(batch)):
            for layout in layouts:
                slot = self._slot() if layout.kind == "video" else None
                if slot is not None:
                    frames = pixels[start:start + layout.crops].permute(0, 2, 3, 1).cpu().numpy()  # (n, r, r, 3)
                    prompt = prompt_text(batch["input_ids"][row], batch["attention_mask"][row], processor.tokenizer,
                                         processor.image_token_id)
                    video = CapturedVideo(str(batch["ids"][row]), str(batch["tasks"][row]), frames, prompt,
                                          list(layout.frame_indices), list(layout.timestamps))
                    self.items[slot:slot + 1] = [video]
                start += layout.crops


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) for n tiles: at most MAX_COLUMNS a row, rows as evenly filled as possible."""
    rows = max(1, math.ceil(n / MAX_COLUMNS))
    return rows, max(1, math.ceil(n / rows))


def tile_boxes(n: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of each frame's tile in the sheet, in reading order."""
    scale = max(1, math.ceil(MIN_TILE / min(height, width)))
    h, w = height * scale, width * scale
    columns = grid_shape(n)[1]
    boxes = []
    for k in range(n):
        row, col = divmod(k, columns)
        left, top = PAD + col * (w + PAD), PAD + row * (h + LABEL_H + PAD)
        boxes.append((left, top, left + w, top + h))
    return boxes


def wrap(text: str, draw: ImageDraw.ImageDraw, font: Any, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to `width` pixels; the last kept line ends in '...' when text is left over."""
    lines: list[str] = []
    for word in text.split() or [""]:
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [lines[max_lines - 1] + " ..."]
    return lines


def draw_sheet(frames: np.ndarray, caption: list[str], frame_labels: list[str]) -> Image.Image:
    """(n, h, w, 3) uint8 frames tiled (see `tile_boxes`), each with its label, caption lines below."""
    n, height, width = frames.shape[:3]
    boxes = tile_boxes(n, height, width)
    grid_w, grid_h = max(b[2] for b in boxes) + PAD, max(b[3] for b in boxes) + LABEL_H + PAD
    sheet_w = max(grid_w, MIN_WIDTH)
    probe, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    lines = [line for text in caption for line in wrap(text, probe, font, sheet_w - 2 * PAD)]
    sheet = Image.new("RGB", (sheet_w, grid_h + LINE_H * len(lines) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for frame, box, label in zip(frames, boxes, frame_labels):
        tile = Image.fromarray(frame).resize((box[2] - box[0], box[3] - box[1]), Image.NEAREST)
        sheet.paste(tile, box[:2])
        draw.text((box[0], box[3] + 1), label, fill=TEXT, font=font)
    for k, line in enumerate(lines):
        draw.text((PAD, grid_h + k * LINE_H), line, fill=TEXT, font=font)
    return sheet


def frame_label(k: int, video: CapturedVideo) -> str:
    """`frame 12  2.5s`: the frame's index in the clip and its time, where the decoder gave them."""
    index = video.frame_indices[k] if k < len(video.frame_indices) else k
    time = f"  {video.timestamps[k]:.1f}s" if k < len(video.timestamps) else ""
    return f"frame {index}{time}"


def sheet_for(video: CapturedVideo, record: dict[str, Any]) -> Image.Image:
    caption = [f"{video.task}  {video.id}  ({len(video.frames)} frames)", f"prompt: {video.prompt}",
               f"reference: {record.get('answer')!s}", f"prediction: {record.get('prediction') or '(empty)'!s}"]
    return draw_sheet(video.frames, caption, [frame_label(k, video) for k in range(len(video.frames))])


def save_contact_sheets(videos: list[CapturedVideo], records: list[dict[str, Any]],
                        directory: str | Path) -> list[Path]:
    """One PNG per captured video that has a prediction record (matched on task and id); their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_key = {(str(r.get("task")), str(r.get("id"))): r for r in records}
    paths = []
    for video in sorted(videos, key=lambda v: (v.task, v.id)):
        record = by_key.get((video.task, video.id))
        if record is None:
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{len(paths):03d}_{video.task}_{video.id}")[:120]
        paths.append(directory / f"{name}.png")
        sheet_for(video, record).save(paths[-1])
    return paths
