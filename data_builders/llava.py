"""LLaVA-format JSON (LLaVA-1.5 / LLaVA-NeXT instruction data) -> canonical samples.

Layout as published: one JSON array (or JSONL) of records

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}]}

`image` may be a list (multi-image) or absent (text-only). `from` is `human`|`gpt`|`system`
(also `user`|`assistant`). A record whose `<image>` count differs from its images, with an
unknown role, or without an assistant turn is skipped with the reason. Records with an image but
no `<image>` tag get one prepended to the first human turn, as LLaVA's training code does.

`parse_conversation` (the turn list) also serves the Ferret-UI reader and the video instruction
builders, which share this conversation format.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from mm15.base.data.sample import IMAGE_TOKEN, Media, Sample, SampleError, Skip, Turn
from mm15.base.data.sources import read_json_records, samples_from_rows

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TURN_FORMAT = "{'from': 'human'|'gpt'|'system', 'value': str}"


def parse_conversation(row: Any, error: Callable[[str], SampleError], num_media: int = 0) -> list[Turn]:
    """A record's `conversations`, `[{"from": "human"|"gpt"|..., "value": str}, ...]`, -> `Turn`s
    with roles from `ROLE_MAP`. `error(reason)` makes the `SampleError` naming the record and file.

    With `num_media` items and no `<image>` in any turn, that many markers are put before the first
    human turn, as LLaVA's (and Ferret-UI's) training code does.
    """
    conversations = row.get("conversations") if isinstance(row, dict) else None
    if not isinstance(conversations, list) or not conversations:
        raise error("missing or empty 'conversations'")
    turns = []
    for k, message in enumerate(conversations):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise error(f"turn {k}: expected {TURN_FORMAT}, got {str(message)[:80]}")
        role = ROLE_MAP.get(str(message.get("from")).lower())
        if role is None:
            raise error(f"turn {k}: expected {TURN_FORMAT}, got unknown role {message.get('from')!r}")
        turns.append(Turn(role, message["value"]))
    if num_media and not any(IMAGE_TOKEN in t.text for t in turns):
        first = next((t for t in turns if t.role == "user"), turns[0])
        first.text = IMAGE_TOKEN * num_media + "\n" + first.text
    return turns


def llava_record_to_sample(row: Any, label: str, source: str, media_key: str = "image",
                           kind: str = "image", task: str = "default") -> Sample:
    """One LLaVA record -> a `Sample` (not yet validated: `samples_from_rows` does that)."""
    record_id = str(row.get("id", label)) if isinstance(row, dict) else label
    paths = row.get(media_key) if isinstance(row, dict) else None
    paths = [] if paths is None else paths if isinstance(paths, list) else [paths]  # not str(): 5 is no file name
    turns = parse_conversation(row, partial(SampleError, record_id, source), num_media=len(paths))
    return Sample(record_id, turns, [Media(path=p, kind=kind) for p in paths], task=task, source=source)


class LlavaJsonSource:
    """Args: path: JSON array or JSONL file; media_root: image folder (default: the file's folder);
    task: task name for metrics; require_answer: False for prediction inputs."""

    def __init__(self, path: str, media_root: str | None = None, task: str = "default", require_answer: bool = True):
        self.path = str(path)
        self.media_root = media_root if media_root is not None else str(Path(path).parent)
        self.task = task
        self.require_answer = require_answer

    def to_sample(self, row: Any, label: str) -> Sample:
        return llava_record_to_sample(row, label, self.path, task=self.task)

    def read(self) -> Iterator[Sample | Skip]:
        yield from samples_from_rows(read_json_records(self.path), self.path, self.to_sample, self.require_answer)
