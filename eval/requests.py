"""lmms-eval requests -> mm15 `Sample`s -> the module's own processor; nothing is preprocessed here.

A request is a context (the task's prompt text) and its visuals: PIL images, image paths or video
paths (lmms-eval passes a video as its path; a path with an image suffix is taken as an image).
Each request becomes one `Sample`, which the processor the model was trained with turns into
tensors (splitting, indicator text, chat template, placeholders, frame sampling and decoding):

* media: a PIL image is written losslessly (PNG) to a scratch folder and read back by the
  processor as any image file of a JSONL record is; paths are used as they are; videos need a
  processor with a video part (`mm15.video.processor.VideoProcessor`).
* markers: a context holding one `<image>` per visual keeps them where they are; a context without
  any (what benchmarks send) gets one `<image>` line per visual in front, as in LLaVA's data and
  our builders ("<image>\\nWhat colour is the shape? ..."); any other count is refused.
* regions: with `regions=True` the sample gets the system turn the processor gives a sample with
  regions (the saved `system_prompt`, else the box codec's prompt stating its canvas), for
  grounding and referring benchmarks, whose boxes are already text.
* loglikelihood: the continuation is the assistant's reply, labelled alone (its end-of-turn token
  included, as in training).

    encoder = RequestEncoder(module.processor, "runs/base_demo/model")
    batch = encoder.batch([Request("mm15_shapes", "test", 0, "What colour is the shape?", [image])], generate=True)
    module.generate(batch)   # the same strings `mm15 test` writes for the same record
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mm15.base.data.processor import MM15Processor
from mm15.base.data.sample import IMAGE_TOKEN, Media, Sample, SampleError, Turn

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class RequestError(ValueError):
    """A request the model cannot answer as asked, naming the task, the document and why."""


@dataclass
class Request:
    """One lmms-eval request: `visuals` as `doc_to_visual` returned them; `continuation` for
    loglikelihood requests only."""

    task: str
    split: str
    doc_id: int
    context: str
    visuals: list[Any] = field(default_factory=list)
    continuation: str | None = None

    @property
    def name(self) -> str:
        return f"lmms-eval task {self.task!r} ({self.split} split) document {self.doc_id}"


def flatten_visuals(visuals: Any) -> list[Any]:
    """`doc_to_visual`'s answer as a flat list (tasks return None, one item or nested lists)."""
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [x for v in visuals for x in flatten_visuals(v)]
    return [visuals]


def place_markers(request: Request, n_media: int) -> str:
    """The user text with one `<image>` per media item (see the module docstring)."""
    found = request.context.count(IMAGE_TOKEN)
    if found == n_media:
        return request.context
    if found == 0:
        return f"{IMAGE_TOKEN}\n" * n_media + request.context
    raise RequestError(f"{request.name}: the context holds {found} {IMAGE_TOKEN} markers but the request has "
                       f"{n_media} visuals; give one marker per visual or none")


class RequestEncoder:
    """Requests -> processed, collated batches through `processor` (the module's own).

    Args:
        processor: `module.processor`, built from the saved preprocessing spec.
        model_name: named in errors (the path the model was loaded from).
        regions: give every sample the system turn of samples with regions (see module docstring).
    """

    def __init__(self, processor: MM15Processor, model_name: str, regions: bool = False):
        self.processor = processor
        self.model_name = model_name
        self.regions = regions

    @property
    def takes_videos(self) -> bool:
        return hasattr(self.processor.spec, "video")

    def media(self, request: Request, index: int, visual: Any, scratch: Path) -> Media:
        if isinstance(visual, Image.Image):
            scratch.mkdir(parents=True, exist_ok=True)
            path = scratch / f"{index}.png"
            visual.convert("RGB").save(path, compress_level=1)  # lossless: the processor reads these pixels
            return Media(str(path))
        if not isinstance(visual, (str, os.PathLike)):
            raise RequestError(f"{request.name}: visual {index} is a {type(visual).__name__}; mm15 takes PIL images, "
                               "image paths and video paths")
        path = os.fspath(visual)
        if Path(path).suffix.lower() in IMAGE_SUFFIXES:
            return Media(path)
        if not self.takes_videos:
            raise RequestError(
                f"{request.name}: visual {index} is a video ({path}), but the model {self.model_name} has no video "
                "part in its saved preprocessing spec (it was saved by an image module, so nothing says how to "
                "sample its frames); give model_args num_frames=N to answer videos training-free, as "
                "configs/video/training_free.yaml does")
        return Media(path, kind="video")

    def sample(self, request: Request, scratch: Path) -> Sample:
        visuals = flatten_visuals(request.visuals)
        media = [self.media(request, k, v, scratch) for k, v in enumerate(visuals)]
        turns = []
        if self.regions:  # the processor's own rule for samples with regions (MM15Processor.build_messages)
            spec = self.processor.spec
            turns.append(Turn("system", spec.system_prompt or spec.boxes.prompt()))
        turns.append(Turn("user", place_markers(request, len(media))))
        if request.continuation is not None:
            turns.append(Turn("assistant", request.continuation))
        sample = Sample(f"{request.task}/{request.split}/{request.doc_id}", turns, media, task=request.task,
                        source=request.name)
        return sample.validate(require_answer=request.continuation is not None)

    def item(self, request: Request, scratch: Path, generate: bool) -> dict[str, Any]:
        try:
            sample = self.sample(request, scratch)
            return self.processor(sample, generate=generate)
        except SampleError as e:
            raise RequestError(self.explain(request, e.reason)) from None

    def explain(self, request: Request, reason: str) -> str:
        message = f"{request.name}: {reason}"
        if "max_length" in reason:
            n = len(flatten_visuals(request.visuals))
            message += (f" (in an evaluation: refused, since a skipped request would change the score); its "
                        f"{n} visuals need more than the context of {self.model_name} holds: give model_args "
                        f"max_length=N (now {self.processor.spec.max_length})"
                        + (" or fewer frames with num_frames=N" if self.takes_videos else ""))
        return message

    def batch(self, requests: list[Request], generate: bool) -> dict[str, Any]:
        """One collated batch: left-padded prompts to generate from, or right-padded prompt + reply."""
        with tempfile.TemporaryDirectory(prefix="mm15-eval-") as tmp:
            items = [self.item(r, Path(tmp) / str(k), generate) for k, r in enumerate(requests)]
        return self.processor.collate(items, padding_side="left" if generate else "right")
