"""Prepared shards: any source written once as Parquet (Hugging Face `datasets`), then streamed.

`mm15 prepare --config X [--out DIR]` reads each `ShardedSource`'s `source` (parsing, validation,
media paths resolved under the media root), embeds every image's bytes, keeps videos by path
(relative to the media root, recorded in the manifest), measures each sample's tokens with the
run's processor (`mm15.base.data.plan`, headers only) and writes

    <shards>/shard-00000.parquet ...   rows: index, id, turns, media (kind, path, bytes, start, end),
                                        task, source, meta (JSON), num_tokens
    <shards>/mm15_shards.json          records and bytes per shard, the media root, what was skipped,
                                        the preprocessing spec and tokenizer fingerprint

The manifest is written last, so shards without one are an unfinished prepare. `<shards>` is a local
folder or any fsspec URL (`hf://datasets/...`, `s3://...`; `storage_options` for credentials).

Training streams the shards (`datasets.load_dataset("parquet", streaming=True)`) without loading
them: per lane (`mm15.base.training.resumable.DrawStream`) the shards are taken in a seeded order
per pass, lane c reading shards c, c + lanes, ... (what `split_dataset_by_node(..., strategy="shards")`
gives node c), and rows are shuffled inside windows of `shuffle_window` records. A position is a
count of draws: it maps to a shard and a row through the manifest, where the stream reopens, so a
resume reads nothing twice and no state of the stream itself needs saving. A source that fits in
one window is drawn in exactly the in-memory order.

Refused at start-up, saying why: no manifest (run `mm15 prepare`), shards prepared with another
preprocessing spec or tokenizer (what differs), a shard whose size or row count differs from the
manifest (truncated or corrupt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from mm15.base.data.mixtures import order_key
from mm15.base.data.sample import Media, Sample, SampleError, Skip, Turn
from mm15.base.data.sources import SampleSource
from mm15.base.specs import diff_specs

log = logging.getLogger(__name__)
MANIFEST = "mm15_shards.json"
FORMAT = "mm15-shards/1"


def features() -> Any:
    from datasets import Features, List, Value

    media = {"kind": Value("string"), "path": Value("string"), "bytes": Value("binary"),
             "start": Value("float64"), "end": Value("float64")}
    turn = {"role": Value("string"), "text": Value("string"), "boxes": List(List(Value("float64")))}
    return Features({"index": Value("int64"), "id": Value("string"), "turns": List(turn), "media": List(media),
                     "task": Value("string"), "source": Value("string"), "meta": Value("string"),
                     "num_tokens": Value("int64")})


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What makes two tokenizers tokenize alike: vocabulary, chat template, special tokens."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    template = str(getattr(tokenizer, "chat_template", "") or "")
    return {"name": str(getattr(tokenizer, "name_or_path", "")), "size": len(tokenizer),
            "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()[:16],
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
            "special": sorted(map(str, tokenizer.all_special_tokens))}


def processing_spec(processor: Any) -> dict[str, Any]:
    """The spec a prepare is tied to: the preprocessing dataclass and the tokenizer's fingerprint."""
    return {"preprocessing": json.loads(json.dumps(asdict(processor.spec))),
            "tokenizer": tokenizer_fingerprint(processor.tokenizer)}


def url_join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


# ----- writing -------------------------------------------------------------------------------------
def sample_to_row(sample: Sample, index: int, media_root: str | None, num_tokens: int | None) -> dict[str, Any]:
    """A resolved sample -> one shard row: image bytes read in, every path relative to the media root."""
    media = []
    for m in sample.media:
        data = m.data
        if m.kind == "image" and data is None:
            try:
                with open(m.path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise sample.error(f"image file not readable: {m.path} ({type(e).__name__})") from None
        elif m.kind == "video" and not os.path.exists(m.path):
            raise sample.error(f"video not found: {m.path}")
        path = os.path.relpath(m.path, media_root) if media_root and os.path.isabs(m.path) else m.path
        media.append({"kind": m.kind, "path": path, "bytes": data if m.kind == "image" else None,
                      "start": m.start, "end": m.end})
    turns = [{"role": t.role, "text": t.text, "boxes": [list(map(float, b)) for b in t.boxes]} for t in sample.turns]
    return {"index": index, "id": sample.id, "turns": turns, "media": media, "task": sample.task,
            "source": sample.source, "meta": json.dumps(sample.meta, default=str), "num_tokens": num_tokens}


def row_to_sample(row: dict[str, Any], media_root: str | None) -> Sample:
    """One shard row -> a `Sample`: images carry their bytes, videos their path under `media_root`."""
    media = []
    for m in row["media"]:
        path = m["path"] if not media_root or os.path.isabs(m["path"]) else os.path.join(media_root, m["path"])
        media.append(Media(path=path, kind=m["kind"], start=m["start"], end=m["end"], data=m["bytes"]))
    turns = [Turn(t["role"], t["text"], [list(b) for b in t["boxes"] or []]) for t in row["turns"]]
    return Sample(row["id"], turns, media, row["task"] or "default", row["source"] or "", json.loads(row["meta"] or "{}"))


def write_shards(items: Iterable[Sample | Skip], out: str, *, media_root: str | None, shard_size: int = 10_000,
                 spec: dict[str, Any] | None = None, measure: Callable[[Sample], int] | None = None,
                 on_skip: Callable[[Skip], None] | None = None, storage_options: dict[str, Any] | None = None,
                 origin: str = "") -> dict[str, Any]:
    """Write resolved samples (Skips are passed to `on_skip`) as Parquet shards plus the manifest.

    `measure(sample)` gives the sample's token count (stored per row; a `SampleError` from it is a
    skip); `spec` is `processing_spec(processor)` when measured. Returns the manifest."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # one bar per prepare (the caller's), not one per shard
    fs, root = filesystem(out, storage_options)
    fs.makedirs(root, exist_ok=True)
    if fs.exists(url_join(root, MANIFEST)):
        fs.rm(url_join(root, MANIFEST))  # the old shards are void from here on
    shards, rows, skipped, index = [], [], 0, 0
    feats = features()

    def flush() -> None:
        name = f"shard-{len(shards):05d}.parquet"
        with fs.open(url_join(root, name), "wb") as f:
            Dataset.from_list(rows, features=feats).to_parquet(f)
        shards.append({"file": name, "records": len(rows), "bytes": fs.size(url_join(root, name))})
        rows.clear()

    for item in items:
        try:
            if isinstance(item, Skip):
                raise SampleError(item.record_id, item.source, item.reason)
            tokens = measure(item) if measure else None
            rows.append(sample_to_row(item, index, media_root, tokens))
            index += 1
        except SampleError as e:
            skipped += 1
            if on_skip:
                on_skip(item if isinstance(item, Skip) else e.as_skip("prepare"))
            continue
        if len(rows) == shard_size:
            flush()
    if rows or not shards:
        flush()
    manifest = {"format": FORMAT, "records": index, "skipped": skipped, "shards": shards,
                "media_root": os.path.abspath(media_root) if media_root else None, "spec": spec, "origin": origin}
    with fs.open(url_join(root, MANIFEST), "w") as f:
        f.write(json.dumps(manifest, indent=1))
    return manifest


# ----- reading -------------------------------------------------------------------------------------
class ShardedSource:
    """A source prepared as shards (see the module docstring); streamed in training, read whole for
    evaluation splits and `mm15 plan`.

    Args:
        shards: folder or fsspec URL of the shards (`mm15 prepare` writes there).
        source: what `mm15 prepare` reads (any `SampleSource`); not needed to train.
        shuffle_window: records shuffled together while streaming (held in memory per lane).
        media_root: where video paths live (default: the manifest's, where they were prepared).
        storage_options: fsspec options (credentials, endpoints) for remote shards.
    """

    def __init__(self, shards: str, source: SampleSource | None = None, shuffle_window: int = 1000,
                 media_root: str | None = None, storage_options: dict[str, Any] | None = None):
        self.shards, self.source = str(shards), source
        self.shuffle_window = shuffle_window
        self.storage_options = storage_options
        self._media_root = media_root
        self._manifest: dict[str, Any] | None = None

    def prepare(self) -> None:
        """Called by the data module before training: the shards must exist (and be whole)."""
        self.check()

    @property
    def media_root(self) -> str | None:
        return self._media_root or self.manifest.get("media_root")

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            fs, root = filesystem(self.shards, self.storage_options)
            path = url_join(root, MANIFEST)
            if not fs.exists(path):
                raise FileNotFoundError(f"{self.shards}: no prepared shards ({MANIFEST} missing); write them with "
                                        "`mm15 prepare --config <this config>`")
            with fs.open(path, "r") as f:
                manifest = json.load(f)
            if manifest.get("format") != FORMAT:
                raise ValueError(f"{self.shards}: {MANIFEST} is format {manifest.get('format')!r}, expected {FORMAT!r}")
            self._manifest = manifest
        return self._manifest

    def __len__(self) -> int:
        return int(self.manifest["records"])

    def files(self) -> list[str]:
        return [url_join(self.shards, s["file"]) for s in self.manifest["shards"]]

    def check(self) -> None:
        """Every shard present, of the size and row count the manifest says (the footer is read)."""
        import pyarrow.parquet as pq

        fs, root = filesystem(self.shards, self.storage_options)
        for shard in self.manifest["shards"]:
            path = url_join(root, shard["file"])
            size = fs.size(path) if fs.exists(path) else None
            problem = "missing" if size is None else (f"{size} bytes, the manifest says {shard['bytes']}"
                                                      if size != shard["bytes"] else None)
            if problem is None:
                try:
                    with fs.open(path, "rb") as f:
                        rows = pq.ParquetFile(f).metadata.num_rows
                    problem = None if rows == shard["records"] else f"{rows} rows, the manifest says {shard['records']}"
                except Exception as e:  # noqa: BLE001 - pyarrow's errors name no file
                    problem = f"unreadable Parquet footer ({type(e).__name__}: {e})"
            if problem:
                raise ValueError(f"{self.shards}: shard {shard['file']} is truncated or corrupt: {problem}; "
                                 "prepare again (`mm15 prepare --config ...`)")

    def check_spec(self, spec: dict[str, Any]) -> None:
        """Refuse shards measured with another preprocessing spec or tokenizer, naming what differs."""
        saved = self.manifest.get("spec")
        if saved is None:
            return
        diffs = diff_specs(saved, json.loads(json.dumps(spec)))
        if diffs:
            raise ValueError(f"{self.shards}: prepared with another preprocessing spec or tokenizer; prepare again "
                             "or train with the config they were prepared with:\n  " + "\n  ".join(diffs[:12]))

    def stream(self, files: list[str], skip: int = 0) -> Any:
        """The rows of `files`, in that order, from row `skip` of the first, as Arrow tables."""
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=files, split="train", streaming=True, features=features(),
                          storage_options=self.storage_options)
        return (ds.skip(skip) if skip else ds).with_format("arrow")

    def read(self) -> Iterator[Sample | Skip]:
        root = self.media_root
        for table in self.stream(self.files()).iter(batch_size=1024):
            for row in table.to_pylist():
                yield row_to_sample(row, root)


class ShardRecords:
    """A `ShardedSource` as a record set of the draw order (`mm15.base.training.resumable.RecordSet`).

    Args:
        source: the shards; keep: sorted record indices a cap keeps (None: all);
        transform: applied to every loaded sample (curation, media resolution).
    """

    def __init__(self, source: ShardedSource, keep: np.ndarray | None = None,
                 transform: Callable[[Sample], Sample] | None = None):
        self.source, self.keep, self.transform = source, keep, transform
        self.window = max(1, source.shuffle_window)
        shards = source.manifest["shards"]
        self.files = source.files()
        self.starts = np.concatenate([[0], np.cumsum([s["records"] for s in shards])]).astype(np.int64)
        if keep is None:
            self.kept = np.diff(self.starts)
        else:
            self.kept = np.diff(np.searchsorted(keep, self.starts))

    def shard_order(self, epoch: int, source: int, passes: int, seed: int) -> np.ndarray:
        """This pass's shard order (the written order when everything fits in one window)."""
        if self.kept.sum() <= self.window:
            return np.arange(len(self.files))
        key = order_key(seed, epoch, source, 0, passes, 1 << 20)
        return np.random.default_rng(key).permutation(len(self.files))

    def lane_shards(self, order: np.ndarray, lane: int, lanes: int) -> np.ndarray:
        if len(self.files) < lanes:
            raise ValueError(f"{self.source.shards}: {len(self.files)} shards for {lanes} lanes; prepare with "
                             f"a smaller shard size (at least {lanes} shards)")
        return order[lane::lanes]

    def lane_size(self, lane: int, lanes: int) -> int:
        return int(self.kept[self.lane_shards(np.arange(len(self.files)), lane, lanes)].sum())

    def refs(self, epoch: int, source: int, lane: int, lanes: int, start: int, seed: int) -> Iterator[Any]:
        size = self.lane_size(lane, lanes)
        passes, offset = divmod(start, size)
        while True:
            yield from self._pass(epoch, source, lane, lanes, passes, offset, seed)
            passes, offset = passes + 1, 0

    def _pass(self, epoch: int, source: int, lane: int, lanes: int, passes: int, offset: int,
              seed: int) -> Iterator[Any]:
        """One pass over the lane from kept row `offset`: windows of rows, each shuffled."""
        import pyarrow as pa

        shards = self.lane_shards(self.shard_order(epoch, source, passes, seed), lane, lanes)
        window, skip_in_window = divmod(offset, self.window)
        first, row = self._locate(shards, window * self.window)
        tables = self.source.stream([self.files[i] for i in shards[first:]], skip=row).iter(batch_size=1024)
        pending: list[Any] = []
        size = int(self.kept[shards].sum())
        while window * self.window < size:
            want = min(self.window, size - window * self.window)
            have = sum(t.num_rows for t in pending)
            for table in tables:
                table = self._kept_rows(table)
                pending.append(table)
                have += table.num_rows
                if have >= want:
                    break
            rows = pa.concat_tables(pending) if pending else None
            if rows is None or rows.num_rows < want:
                raise ValueError(f"{self.source.shards}: the shards hold fewer rows than the manifest says; "
                                 "truncated or changed since prepare")
            current, pending = rows.slice(0, want), [rows.slice(want)]
            perm = torch_perm(want, order_key(seed, epoch, source, lane, passes, window))
            for i in perm[skip_in_window:]:
                yield current, int(i)
            window, skip_in_window = window + 1, 0

    def _locate(self, shards: np.ndarray, kept_row: int) -> tuple[int, int]:
        """(position in `shards`, raw row inside that shard) of the lane's `kept_row`-th kept record."""
        counts = np.cumsum(self.kept[shards])
        k = int(np.searchsorted(counts, kept_row, side="right"))
        if k >= len(shards):
            return k, 0
        within = kept_row - (int(counts[k - 1]) if k else 0)
        if self.keep is None:
            return k, within
        shard = shards[k]
        first_kept = int(np.searchsorted(self.keep, self.starts[shard]))
        return k, int(self.keep[first_kept + within] - self.starts[shard])

    def _kept_rows(self, table: Any) -> Any:
        if self.keep is None:
            return table
        index = table.column("index").to_numpy()
        pos = np.clip(np.searchsorted(self.keep, index), 0, len(self.keep) - 1)
        return table.filter(self.keep[pos] == index)

    def load(self, ref: tuple[Any, int]) -> Sample:
        table, i = ref
        sample = row_to_sample(table.slice(i, 1).to_pylist()[0], self.source.media_root)
        return self.transform(sample) if self.transform else sample


def torch_perm(n: int, key: int) -> np.ndarray:
    """`torch.randperm(n)` under `key`: the permutation `ResumableSampler` uses."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(key)).numpy()
