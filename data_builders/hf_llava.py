"""Hugging Face datasets in LLaVA layout (Parquet with an image column plus `conversations`).

Many instruction sets on the Hub are published this way (e.g. the LLaVA-OneVision data): one row per
record, `conversations` as in LLaVA's JSON (`[{"from": "human" | "gpt", "value": ...}]`,
`mm15.data_builders.llava.parse_conversation`), the image embedded as a `datasets.Image` value
(`{"bytes": ..., "path": ...}`), a list of them, or null for text-only rows.

    source = HFLlavaSource("hf://datasets/<owner>/<name>/data/*.parquet")   # or local files
    mm15 prepare ...   # with a ShardedSource whose `source` is this: written once, streamed after

Rows are streamed (`datasets.load_dataset("parquet", streaming=True)`, Arrow format: no image is
decoded here); each image keeps its bytes (`Media.data`), named `<file>#<row>` in errors.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator

from mm15.base.data.sample import Media, Sample, SampleError, Skip
from mm15.base.data.sources import samples_from_rows

from .llava import parse_conversation


class HFLlavaSource:
    """Args:
    data_files: Parquet file(s): local paths, globs or fsspec URLs (`hf://datasets/...`).
    image_column, conversations_column, id_column: the columns (an absent id column: the row number).
    task: task name for the metrics; require_answer: False for prediction inputs.
    storage_options: fsspec options for remote files.
    """

    def __init__(self, data_files: str | list[str], image_column: str = "image",
                 conversations_column: str = "conversations", id_column: str = "id", task: str = "default",
                 require_answer: bool = True, storage_options: dict[str, Any] | None = None):
        self.data_files = data_files
        self.path = data_files if isinstance(data_files, str) else data_files[0]  # names errors and the source
        self.image_column, self.conversations_column, self.id_column = image_column, conversations_column, id_column
        self.task, self.require_answer = task, require_answer
        self.storage_options = storage_options
        self.media_root = None  # images are embedded

    def rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=self.data_files, split="train", streaming=True,
                          storage_options=self.storage_options).with_format("arrow")
        n = 0
        for table in ds.iter(batch_size=256):
            for row in table.to_pylist():
                yield f"#{n}", row
                n += 1

    def to_sample(self, row: dict[str, Any], label: str) -> Sample:
        record_id = str(row.get(self.id_column) if row.get(self.id_column) is not None else label)
        images = row.get(self.image_column)
        images = [] if images is None else images if isinstance(images, list) else [images]
        media = []
        for k, image in enumerate(images):
            data = image.get("bytes") if isinstance(image, dict) else image
            if not isinstance(data, (bytes, bytearray)):
                raise SampleError(record_id, self.path, f"image {k}: no embedded bytes (got {type(data).__name__})")
            name = (image.get("path") if isinstance(image, dict) else None) or f"image{k}"
            media.append(Media(path=f"{self.path}{label}/{name}", data=bytes(data)))
        convo = {"conversations": row.get(self.conversations_column)}
        turns = parse_conversation(convo, partial(SampleError, record_id, self.path), num_media=len(media))
        return Sample(record_id, turns, media, task=self.task, source=self.path)

    def read(self) -> Iterator[Sample | Skip]:
        yield from samples_from_rows(self.rows(), self.path, self.to_sample, self.require_answer)
