"""Sample -> tensors: media loading and splitting, region text, chat template, assistant-only labels.

The processor knows nothing about dataset file formats (that is `mm15.data_builders`) and the model
knows nothing about text. Variants override the hooks `load_media` (video frames), `media_text`
(timestamps, indicators) and `build_messages`.

    processor = MM15Processor(tokenizer, PreprocessSpec(), tokens_per_crop=144)
    item = processor(sample)                    # training: labels on assistant tokens only
    item = processor(sample, generate=True)     # prompt only, ends with the assistant header
    batch = processor.collate([item, ...])      # padded; pixel_values (C, 3, r, r) uint8
    batch["layouts"][b][k]                      # MediaLayout of sample b's k-th media item

Each media item becomes a `MediaBlock`: its crops, its text, and its `mm15.base.data.media.MediaLayout`
(kind, path, crops, placeholders per marker, grid, source size, ...), which travels on through
`collate` to the model and into the test/predict records.

Token layout of one media item split into crops (position indicator `index`):
    "(1,1,1)" <image>*M "(1,1,2)" <image>*M ... "(1,0,0)" <image>*M      # overview last
`M = tokens_per_crop` from `mm15.base.connector.tokens_per_crop`, the single count function.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from transformers import PreTrainedTokenizerBase

from mm15.base.data.boxes import BoxCodec
from mm15.base.data.chat import ChatTemplate, TemplateRefused
from mm15.base.data.media import CLIP_MEAN, CLIP_STD, MediaLayout
from mm15.base.data.sample import BOX_MARKER, IGNORE_INDEX, IMAGE_TOKEN, Media, Sample, Skip, region_outside
from mm15.base.data.splitting import SplitPlan, SplitSpec, split_image


@dataclass
class PreprocessSpec:
    """Everything that turns a sample into tensors; saved with every checkpoint and export.

    Args:
        split: image splitting (see `mm15.base.data.splitting.SplitSpec`).
        position_indicator: text around each crop: `index` ("(k,i,j)", MM1.5's final recipe),
            `seps` ("," between crops of a row, newline after a row) [choice] or `none`.
        index_format: the exact text of the index tuple [choice].
        image_mean, image_std: the vision tower's normalisation (CLIP's by default).
        max_length: samples longer than this are skipped (never cut inside media tokens).
        system_prompt: prepended as a system turn when set; samples with regions get the box
            codec's prompt when this is None. Templates without a system role get it at the start
            of the first user turn (`mm15.base.data.chat`).
        boxes: region <-> text codec.
        seed: seeds the referring box/point draw (per sample, so workers agree).
        chat_template_kwargs: extra variables for the tokenizer's chat template, e.g.
            `{enable_thinking: false}` for Qwen3 / SmolLM3 replies without a thinking block.
        max_image_pixels, max_sample_pixels: width x height caps on one image and on all images of
            a sample, checked from the file headers before anything is decoded (None: no cap); a
            sample over either is skipped naming the file and the sizes. Videos are resized while
            decoding and have no cap here.
    """

    split: SplitSpec = field(default_factory=SplitSpec)
    position_indicator: Literal["index", "seps", "none"] = "index"
    index_format: str = "({k},{i},{j})"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    max_length: int = 4096
    system_prompt: str | None = None
    boxes: BoxCodec = field(default_factory=BoxCodec)
    seed: int = 0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_image_pixels: int | None = 64_000_000  # 8000 x 8000
    max_sample_pixels: int | None = 256_000_000


@dataclass
class MediaBlock:
    """One media item as crops (n, r, r, 3) uint8, the text that stands for it and its layout (one
    `<image>` marker of `text` per entry of `layout.placeholders`, `layout.crops` rows of `crops`)."""

    crops: np.ndarray
    text: str
    layout: MediaLayout

    def __post_init__(self) -> None:
        markers = self.text.count(IMAGE_TOKEN)
        if len(self.crops) != self.layout.crops or markers != len(self.layout.placeholders):
            raise ValueError(f"media block of {len(self.crops)} crops and {markers} markers but its layout says "
                             f"{self.layout.describe()}")


IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(path: str, sample: Sample, data: bytes | None = None) -> np.ndarray:
    """Decode an image file (or its bytes, `data`) to (H, W, 3) uint8; a clear `SampleError` on any failure."""
    # PIL's process-wide LOAD_TRUNCATED_IMAGES (lmms-eval sets it on import) would pad a truncated file
    # silently; a truncated image is a bad record here whatever another library chose.
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except IMAGE_ERRORS as e:
        raise _image_error(e, path, sample) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def image_header_size(path: str, sample: Sample, data: bytes | None = None) -> tuple[int, int]:
    """(width, height) from the image's header (`Image.open` decodes nothing until `load`)."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            return im.size
    except IMAGE_ERRORS as e:
        raise _image_error(e, path, sample) from None


def _image_error(e: Exception, path: str, sample: Sample) -> Exception:
    if isinstance(e, FileNotFoundError):
        return sample.error(f"image file not found: {path}")
    return sample.error(f"unreadable image {path}: {type(e).__name__}: {e}")


class MM15Processor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, spec: PreprocessSpec, tokens_per_crop: int):
        self.tokenizer = tokenizer
        self.spec = spec
        self.tokens_per_crop = tokens_per_crop
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: load it with mm15.base.model.load_tokenizer")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tokens_per_crop > spec.max_length:
            raise ValueError(f"each crop takes {tokens_per_crop} placeholder tokens, more than preprocessing.max_length "
                             f"{spec.max_length}, so every sample with media would be skipped: raise max_length or "
                             "lower the connector's tokens per crop")
        self.chat = ChatTemplate(tokenizer, spec.chat_template_kwargs)

    # ----- hooks -------------------------------------------------------------------------------
    def load_media(self, sample: Sample, index: int, media: Media) -> MediaBlock:
        """Image -> crops (split unless the sample has more images than `max_images_to_split`)."""
        if media.kind != "image":
            raise sample.error(f"media {media.path}: kind {media.kind!r} needs its variant processor (e.g. mm15.video)")
        image = load_rgb(media.path, sample, media.data)
        split = len(sample.media) <= self.spec.split.max_images_to_split
        crops, plan = split_image(image, self.spec.split, split)
        layout = MediaLayout("image", media.path, plan.num_crops, [self.tokens_per_crop] * plan.num_crops,
                             (image.shape[1], image.shape[0]), plan.grid if plan.has_grid else None)
        return MediaBlock(np.stack(crops), self.media_text(index, plan), layout)

    def media_text(self, index: int, plan: SplitPlan) -> str:
        """Text for one media item: one `<image>` per crop with its position indicator."""
        if not plan.has_grid or self.spec.position_indicator == "none":
            return IMAGE_TOKEN * plan.num_crops
        parts = []
        for i, j in plan.crop_order:
            if self.spec.position_indicator == "index":
                parts.append(self.spec.index_format.format(k=index + 1, i=i, j=j) + IMAGE_TOKEN)
            else:
                sep = "" if i == 0 else ("," if j < plan.grid[1] else "\n")
                parts.append(IMAGE_TOKEN + sep)
        return "".join(parts)

    def build_messages(self, sample: Sample, blocks: list[MediaBlock], has_regions: bool | None = None) -> list[dict[str, str]]:
        """Turns -> chat messages with media blocks and region text substituted. `has_regions` is
        decided on the full sample (a grounding answer's boxes count even when generating)."""
        rng = random.Random(f"{self.spec.seed}:{sample.id}")
        size = blocks[0].layout.source_size if blocks else None
        texts = iter(b.text for b in blocks)
        messages = []
        if has_regions is None:
            has_regions = any(t.boxes for t in sample.turns)
        system = self.spec.system_prompt or (self.spec.boxes.prompt() if has_regions else None)
        if system and sample.turns[0].role != "system":
            messages.append({"role": "system", "content": system})
        for turn in sample.turns:
            text = self.render_regions(sample, turn.text, turn.boxes, turn.role, size, rng)
            pieces = text.split(IMAGE_TOKEN)
            text = pieces[0] + "".join(next(texts) + p for p in pieces[1:])
            messages.append({"role": turn.role, "content": text})
        return self.chat.fit(messages)

    def check_pixel_caps(self, sample: Sample) -> None:
        """`max_image_pixels` and `max_sample_pixels` from the headers of the sample's images, before
        any is decoded (PIL's own decompression-bomb guard is far larger and per image only)."""
        spec, total, images = self.spec, 0, [m for m in sample.media if m.kind == "image"]
        if spec.max_image_pixels is None and spec.max_sample_pixels is None or not images:
            return
        for m in images:
            w, h = image_header_size(m.path, sample, m.data)
            if spec.max_image_pixels is not None and w * h > spec.max_image_pixels:
                raise sample.error(f"image {m.path} is {w}x{h} = {w * h} pixels, over max_image_pixels "
                                   f"{spec.max_image_pixels}; skipped before decoding")
            total += w * h
        if spec.max_sample_pixels is not None and total > spec.max_sample_pixels:
            raise sample.error(f"{len(images)} images of {total} pixels in all ({', '.join(m.path for m in images)}), "
                               f"over max_sample_pixels {spec.max_sample_pixels}; skipped before decoding")

    def check_regions(self, sample: Sample, blocks: list[MediaBlock]) -> None:
        """Every region lies on the first image (its range, known only once the image is read; arity and
        orientation are `Sample.validate`'s), for every source alike."""
        if not blocks:
            return
        size = blocks[0].layout.source_size
        for k, turn in enumerate(sample.turns):
            for i, box in enumerate(turn.boxes):
                if region_outside(box, size):
                    raise sample.error(f"turn {k}: region {i} {box!r} lies outside the {size[0]}x{size[1]} image "
                                       f"{blocks[0].layout.path}")

    def render_regions(self, sample: Sample, text: str, boxes: list[list[float]], role: str,
                       size: tuple[int, int] | None, rng: random.Random) -> str:
        if not boxes:
            return text
        if size is None:
            raise sample.error("regions given but the sample has no image to place them on")
        codec = self.spec.boxes

        def sub(m: Any) -> str:
            box = boxes[int(m.group(1))]
            region = codec.referring_region(box, rng) if role == "user" else box
            return codec.encode(region, size)

        return BOX_MARKER.sub(sub, text)

    # ----- sample -> tensors ---------------------------------------------------------------------
    def __call__(self, sample: Sample, generate: bool = False) -> dict[str, Any]:
        """Raises `SampleError` (naming record and file) for anything that makes the sample unusable."""
        answer = sample.answer
        has_regions = any(t.boxes for t in sample.turns)  # same system prompt in training and generation
        if generate and sample.turns[-1].role == "assistant":
            sample = sample.prompt_only()
        self.check_pixel_caps(sample)
        blocks = [self.load_media(sample, k, m) for k, m in enumerate(sample.media)]
        self.check_regions(sample, blocks)
        messages = self.build_messages(sample, blocks, has_regions)
        ids, labels = self.tokenize(messages, generate, sample)
        counts = [c for b in blocks for c in b.layout.placeholders]
        ids, labels = self.expand_placeholders(ids, labels, counts, sample)
        n_crops = sum(len(b.crops) for b in blocks)
        if len(ids) > self.spec.max_length:
            raise sample.error(
                f"sequence of {len(ids)} tokens ({sum(counts)} media tokens in {n_crops} crops) "
                f"exceeds max_length {self.spec.max_length}; skipped, not truncated"
            )
        r = self.spec.split.crop_size
        pixels = np.concatenate([b.crops for b in blocks]) if blocks else np.zeros((0, r, r, 3), np.uint8)
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "pixel_values": torch.from_numpy(pixels).permute(0, 3, 1, 2),  # (n, 3, r, r) uint8
            "id": sample.id, "task": sample.task, "answer": answer, "meta": sample.meta,
            "layouts": [b.layout for b in blocks],
        }

    def tokenize(self, messages: list[dict[str, str]], generate: bool, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Chat template; each assistant reply (with its end token) is the only text that carries
        labels, for prefix-stable templates and others alike (`mm15.base.data.chat.ChatTemplate`)."""
        ids: list[int] = []
        labels: list[int] = []
        try:
            pieces = self.chat.segments(messages, generate)
        except TemplateRefused as e:
            raise sample.error(str(e)) from None
        for text, target in pieces:
            self._append(ids, labels, text, target)
        return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)

    def _append(self, ids: list[int], labels: list[int], text: str, target: bool) -> None:
        if not text:
            return
        new = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(new)
        labels.extend(new if target else [IGNORE_INDEX] * len(new))

    def expand_placeholders(self, ids: np.ndarray, labels: np.ndarray, counts: list[int],
                            sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """The k-th `<image>` id -> `counts[k]` copies (labels ignored there)."""
        is_media = ids == self.image_token_id
        if int(is_media.sum()) != len(counts):
            raise sample.error(f"{int(is_media.sum())} <image> tokens after templating but {len(counts)} media markers")
        repeats = np.ones_like(ids)
        repeats[is_media] = counts
        labels = np.where(is_media, IGNORE_INDEX, labels)
        return np.repeat(ids, repeats), np.repeat(labels, repeats)

    # ----- batching ------------------------------------------------------------------------------
    def normalize(self, pixel_values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(C, 3, r, r) uint8 -> normalised float, on whatever device the batch is on."""
        mean = torch.tensor(self.spec.image_mean, device=pixel_values.device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.image_std, device=pixel_values.device, dtype=dtype).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on a single temporary
        return pixel_values.to(dtype).mul_(1.0 / (255.0 * std)).add_(-mean / std)

    def collate(self, items: list[dict[str, Any] | Skip], padding_side: str = "right") -> dict[str, Any]:
        batch, items = start_batch(items)
        if not items:
            return batch
        pad = self.tokenizer.pad_token_id
        length = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), length), pad, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, x in enumerate(items):
            n = len(x["input_ids"])
            cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
            ids[row, cols], labels[row, cols], mask[row, cols] = x["input_ids"], x["labels"], 1
        batch.update(input_ids=ids, labels=labels, attention_mask=mask)
        return add_samples(batch, items)


def start_batch(items: list[dict[str, Any] | Skip]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A batch's first keys (`skipped`: the `Skip`s, `size`: the usable samples) and those samples."""
    skipped = [x for x in items if isinstance(x, Skip)]
    usable = [x for x in items if not isinstance(x, Skip)]
    return {"skipped": skipped, "size": len(usable)}, usable


def add_samples(batch: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-sample keys of a batch, in the order of `items`: their crops (`pixel_values`) and
    `ids`, `tasks`, `answers`, `metas`, `layouts` (one `MediaLayout` per media item), `indices`
    (each sample's position in its dataset, None where it has none)."""
    batch["pixel_values"] = torch.cat([x["pixel_values"] for x in items])
    for key in ("id", "task", "answer", "meta"):
        batch[key + "s"] = [x[key] for x in items]
    batch["indices"] = [x.get("index") for x in items]
    batch["layouts"] = [x["layouts"] for x in items]
    return batch
