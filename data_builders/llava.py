"""LLaVA-format JSON (LLaVA-1.5 / LLaVA-NeXT instruction data) -> canonical samples.

Layout as published: one JSON array (or JSONL) of records

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}]}

`image` may be a list (multi-image) or absent (text-only). `from` is `human`|`gpt`|`system`
(also `user`|`assistant`). A record whose `<image>` count differs from its images, with an
unknown role, or without an assistant turn is skipped with the reason. Records with an image but
no `<image>` tag get one prepended to the first human turn, as LLaVA's training code does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from mm15.base.data.sample import IMAGE_TOKEN, Media, Sample, SampleError, Skip, Turn

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_json_records(path: str) -> Iterator[tuple[str, Any] | Skip]:
    """(record label, row) pairs from a JSON array or JSONL file; malformed lines become Skips."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            yield Skip("<file>", path, f"malformed JSON file: {e.msg} at line {e.lineno}")
            return
        yield from ((f"#{i}", row) for i, row in enumerate(rows))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield Skip(f"line {lineno}", path, f"malformed JSON line: {e.msg} at column {e.colno}")


def llava_record_to_sample(row: dict[str, Any], label: str, source: str, media_key: str = "image",
                           kind: str = "image", require_answer: bool = True, task: str = "default") -> Sample:
    record_id = str(row.get("id", label)) if isinstance(row, dict) else label
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
        raise SampleError(record_id, source, "record has no `conversations` list")
    paths = row.get(media_key)
    paths = [] if paths is None else [paths] if isinstance(paths, str) else list(paths)
    turns = []
    for k, msg in enumerate(row["conversations"]):
        if not isinstance(msg, dict) or "value" not in msg:
            raise SampleError(record_id, source, f"turn {k} is not a {{from, value}} object")
        role = ROLE_MAP.get(str(msg.get("from")).lower())
        if role is None:
            raise SampleError(record_id, source, f"turn {k}: unknown role {msg.get('from')!r}")
        turns.append(Turn(role=role, text=str(msg["value"])))
    n_tags = sum(t.text.count(IMAGE_TOKEN) for t in turns)
    if paths and n_tags == 0:
        first_user = next((t for t in turns if t.role == "user"), None)
        if first_user is not None:
            first_user.text = IMAGE_TOKEN * len(paths) + "\n" + first_user.text
    media = [Media(path=str(p), kind=kind) for p in paths]
    return Sample(record_id, turns, media, task=task, source=source).validate(require_answer)


class LlavaJsonSource:
    """Args: path: JSON array or JSONL file; media_root: image folder (default: the file's folder);
    task: task name for metrics; require_answer: False for prediction inputs."""

    def __init__(self, path: str, media_root: str | None = None, task: str = "default", require_answer: bool = True):
        self.path = str(path)
        self.media_root = media_root if media_root is not None else str(Path(path).parent)
        self.task = task
        self.require_answer = require_answer

    def read(self) -> Iterator[Sample | Skip]:
        for item in read_json_records(self.path):
            if isinstance(item, Skip):
                yield item
                continue
            label, row = item
            try:
                yield llava_record_to_sample(row, label, self.path, require_answer=self.require_answer, task=self.task)
            except SampleError as e:
                yield e.as_skip("parse")
