"""Overlays: predicted and true boxes drawn on screenshots, for a sample of test items.

True regions in green (the answer's boxes for grounding, the referred box for referring), predicted
boxes in red, and a caption strip with the task, the prediction and the reference. The screenshot is
the record's first media item (path and original size from its `media` layout). Small screenshots
are enlarged (nearest neighbour) so boxes stay readable. Saved as PNG under the run directory and,
when the logger is TensorBoard, logged as images.

    paths = save_overlays(records, "runs/ui_demo/overlays", BoxCodec(), limit=16)
    log_overlays(trainer.logger, paths, step=trainer.global_step)
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mm15.base.data.boxes import BoxCodec
from mm15.base.data.media import record_layouts
from mm15.base.training.plots import log_images

TRUE_COLOR = (0, 200, 0)
PRED_COLOR = (230, 0, 0)
MIN_SIDE = 256  # enlarge screenshots whose shorter side is below this


def draw_overlay(image: Image.Image, true: list[list[float]], predicted: list[list[float]],
                 caption: list[str]) -> Image.Image:
    """Screenshot with boxes (original pixels) and caption lines below it."""
    scale = max(1, int(np.ceil(MIN_SIDE / min(image.size))))
    big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    line_h = 12
    out = Image.new("RGB", (max(big.width, 200), big.height + line_h * len(caption) + 4), (255, 255, 255))
    out.paste(big, (0, 0))
    draw = ImageDraw.Draw(out)
    for boxes, color in ((true, TRUE_COLOR), (predicted, PRED_COLOR)):
        for box in boxes:
            if len(box) == 4:
                draw.rectangle([v * scale for v in box], outline=color, width=2)
            elif len(box) == 2:
                x, y = box[0] * scale, box[1] * scale
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline=color, width=2)
    for k, line in enumerate(caption):
        draw.text((2, big.height + 2 + k * line_h), line[:80], fill=(0, 0, 0))
    return out


def overlay_for(record: dict[str, Any], codec: BoxCodec) -> Image.Image | None:
    """The overlay of one prediction record; None when it has no screenshot or it cannot be read."""
    meta = record.get("meta") or {}
    layouts = record_layouts(record)
    if not layouts:
        return None
    try:
        with Image.open(layouts[0].path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError):
        return None
    size = layouts[0].source_size
    true = meta.get("answer_boxes") or meta.get("query_boxes") or []
    predicted = codec.decode_regions(record.get("prediction") or "", tuple(size))
    caption = [f"{meta.get('platform', '?')}/{record.get('task')}  green: true  red: predicted",
               f"pred: {record.get('prediction')!s}", f"true: {record.get('answer')!s}"]
    return draw_overlay(image, true, predicted, caption)


def pick_records(records: list[dict[str, Any]], limit: int, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded sample spread over tasks: round-robin over tasks, random order within each."""
    rng = random.Random(seed)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(str(r.get("task")), []).append(r)
    for group in by_task.values():
        rng.shuffle(group)
    picked, queues = [], [by_task[t] for t in sorted(by_task)]
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop())
    return picked


def save_overlays(records: list[dict[str, Any]], directory: str | Path, codec: BoxCodec, limit: int = 16,
                  seed: int = 0) -> list[Path]:
    """Write up to `limit` overlays as PNG; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, record in enumerate(pick_records(records, limit, seed)):
        overlay = overlay_for(record, codec)
        if overlay is not None:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{k:03d}_{record.get('task')}_{record.get('id')}")[:120]
            paths.append(directory / f"{name}.png")
            overlay.save(paths[-1])
    return paths


def log_overlays(logger: Any, paths: list[Path], step: int = 0, tag: str = "test/overlays") -> int:
    """Add the overlays to a TensorBoard logger (others are left alone); returns how many."""
    return log_images(logger, paths, step, tag)
