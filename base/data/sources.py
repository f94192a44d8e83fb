"""Sample sources: the seam between data builders (file formats) and the data module.

A source is any object with `read() -> Iterator[Sample | Skip]`. It may also define
`prepare() -> None` (idempotent work such as generating a synthetic dataset, called once from
`LightningDataModule.prepare_data`) and `media_root: str | None` (where its relative media paths
live; the data module's own `media_root` is used otherwise). Sources never raise on a bad record:
they yield a `Skip` naming the record, the file and the reason, so nothing is silently dropped.

Two core sources live here: the canonical JSONL (`JsonlSource`) and the LLaVA JSON format
(`mm15.data_builders.llava.LlavaJsonSource`). Configure them in YAML with `class_path`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

from mm15.base.data.sample import Sample, SampleError, Skip


@runtime_checkable
class SampleSource(Protocol):
    def read(self) -> Iterator[Sample | Skip]: ...


class JsonlSource:
    """Canonical JSONL: one `Sample.to_dict()` per line (see `mm15.base.data.sample`).

    Args:
        path: the `.jsonl` file.
        media_root: directory that relative media paths are resolved under (default: the file's
            directory).
        require_answer: records without an assistant turn are skipped when True (training and
            evaluation); prediction sets it False.
    """

    def __init__(self, path: str, media_root: str | None = None, require_answer: bool = True):
        self.path = str(path)
        self.media_root = media_root if media_root is not None else str(Path(path).parent)
        self.require_answer = require_answer

    def read(self) -> Iterator[Sample | Skip]:
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Skip(f"line {lineno}", self.path, f"malformed JSON line: {e.msg} at column {e.colno}")
                    continue
                try:
                    if not isinstance(row, dict):
                        raise SampleError(f"line {lineno}", self.path, f"expected a JSON object, got {type(row).__name__}")
                    yield Sample.from_dict(row, source=self.path).validate(self.require_answer)
                except SampleError as e:
                    yield e.as_skip("parse")


def write_jsonl(samples: list[Sample], path: str | Path) -> None:
    """Write samples as canonical JSONL (used by the synthetic builders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            row = s.to_dict()
            row.pop("source", None)
            f.write(json.dumps(row) + "\n")
