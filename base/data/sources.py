"""Sample sources: the seam between data builders (file formats) and the data module.

A source is any object with `read() -> Iterator[Sample | Skip]`. It may also define
`prepare() -> None` (idempotent work such as generating a synthetic dataset, called once from
`LightningDataModule.prepare_data`) and `media_root: str | None` (where its relative media paths
live; the data module's own `media_root` is used otherwise). Sources never raise on a bad record:
they yield a `Skip` naming the record, the file and the reason, so nothing is silently dropped.

Two core sources: the canonical JSONL (`JsonlSource`, here) and the LLaVA JSON format
(`mm15.data_builders.llava.LlavaJsonSource`). Configure them in YAML with `class_path`.

What every builder shares lives here too:

* `samples_from_rows`: the one loop from a file's rows to `Sample | Skip` (each row through the
  builder's `to_sample(row, label)` and `Sample.validate`; every failure a `Skip`);
* `read_json_records`: the rows of a JSON array or JSONL file; `load_json_file`: any JSON data
  file, refused as a whole (`DataFileError`: file, line, column) when it is not valid JSON;
* `build_once`: a generated (synthetic) split is rebuilt only when its parameters change;
  `generated_jsonl` applies it to a split of samples written as canonical JSONL (`write_jsonl`).

    rows = read_json_records("train.jsonl")                      # ("line 3", {...}) or Skip
    yield from samples_from_rows(rows, "train.jsonl", to_sample)
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

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

    def to_sample(self, row: Any, label: str) -> Sample:
        if not isinstance(row, dict):
            raise SampleError(label, self.path, f"expected a JSON object, got {type(row).__name__}")
        return Sample.from_dict(row, source=self.path)

    def read(self) -> Iterator[Sample | Skip]:
        yield from samples_from_rows(read_json_records(self.path), self.path, self.to_sample, self.require_answer)


class MediaEscape(ValueError):
    """A media path outside its media root (`..`, or absolute elsewhere)."""


@functools.lru_cache(maxsize=64)
def _media_base(root: str) -> str:
    return os.path.realpath(root)


def resolve_media_path(path: str, root: str) -> str:
    """`path` made absolute under `root`, or `MediaEscape` when it leads outside. The check is
    lexical, on the normalised path: a symlink inside the root (a dataset linked in from another
    disk) is followed when the file is opened, not refused here, and no file-system call is made
    (millions of records load in seconds). Run it before any file is looked at."""
    base = _media_base(os.path.abspath(root))  # keyed absolute: a relative root means another folder after a chdir
    full = os.path.normpath(os.path.join(base, path))
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise MediaEscape(f"media path {path!r} escapes the media root {base}")
    return full


RowLabel = str  # how a row is named before its id is known: "line 7", "#3", a question id


class DataFileError(ValueError):
    """A data file that cannot be read as a whole (not valid JSON): a start-up error naming the file,
    line and column, never one budgeted skip standing for every record the file held."""


def load_json_file(path: str | Path) -> Any:
    """The parsed JSON of a data file; `DataFileError` naming file, line and column when it is not JSON."""
    return parse_json_text(Path(path).read_text(encoding="utf-8"), path)


def parse_json_text(text: str, path: str | Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def read_json_records(path: str) -> Iterator[tuple[RowLabel, Any] | Skip]:
    """(label, row) pairs from a JSON array (`#i`) or JSONL file (`line n`). A malformed JSONL line
    is a Skip naming the line (one record lost); a malformed array raises `DataFileError` (file,
    line, column) when read, since every record of the file would be lost."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from ((f"#{i}", row) for i, row in enumerate(parse_json_text(text, path)))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield Skip(f"line {lineno}", path, f"malformed JSON line: {e.msg} at column {e.colno}")


def samples_from_rows(rows: Iterable[tuple[RowLabel, Any] | Skip], source: str,
                      to_sample: Callable[[Any, RowLabel], Sample],
                      require_answer: bool = True) -> Iterator[Sample | Skip]:
    """Each row through `to_sample(row, label)` and `Sample.validate`; Skips in `rows` pass through.

    A `SampleError` becomes a Skip naming what it names (the record id where the builder knew it);
    a row the builder could not even read (a missing key, a wrong type) becomes a Skip naming the
    row's label, `source` and the error.
    """
    for item in rows:
        if isinstance(item, Skip):
            yield item
            continue
        label, row = item
        try:
            yield to_sample(row, label).validate(require_answer)
        except SampleError as e:
            yield e.as_skip("parse")
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            yield Skip(label, source, f"malformed record ({type(e).__name__}: {e})", "parse")


def build_once(directory: str | Path, name: str, params: dict[str, Any], build: Callable[[], None]) -> bool:
    """Run `build` (which writes a generated split) unless `<directory>/<name>.params.json` holds
    `params`, i.e. the split there was built with the same parameters; returns whether it built.

    The parameters file is removed before building and written after, so a build that stops half
    way is redone, and a changed parameter (more samples, another seed) regenerates the split.
    """
    stamp = Path(directory) / f"{name}.params.json"
    wanted = json.loads(json.dumps(params))  # tuples as lists, as they read back
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted:
        return False
    stamp.unlink(missing_ok=True)
    build()
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(wanted, indent=1, sort_keys=True), encoding="utf-8")
    return True


def generated_jsonl(root: str | Path, split: str, params: dict[str, Any],
                    generate: Callable[[], list[Sample]]) -> JsonlSource:
    """`<root>/<split>.jsonl`, written from `generate()` (which also writes the media files under
    `root`) unless it was built with the same `params`; returned as the source reading it back."""
    path = Path(root) / f"{split}.jsonl"
    build_once(root, split, params, lambda: write_jsonl(generate(), path))
    return JsonlSource(str(path), media_root=str(root))


def write_jsonl(samples: list[Sample], path: str | Path) -> None:
    """Write samples as canonical JSONL (used by the synthetic builders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            row = s.to_dict()
            row.pop("source", None)
            f.write(json.dumps(row) + "\n")
