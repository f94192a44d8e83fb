"""The data module: sources -> samples -> processed batches, with a quarantine and an error budget.

Bad data never crashes a run and is never silently dropped. Every record that cannot be used (a
malformed line, a missing or corrupt image, a media path outside the media root, a sample longer
than the context) becomes a `Skip` written to `<run dir>/quarantine.jsonl` with the record id, the
file and the reason. When the fraction of skipped samples passes `max_error_fraction` (checked once
at least `min_samples_for_budget` were seen), the run stops with a summary of what went wrong.

    data = MM15DataModule(train=[JsonlSource("train.jsonl")], val=[JsonlSource("val.jsonl")])

The processor comes from the LightningModule (`module.processor`), so data and model always agree
on tokenizer and preprocessing.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mm15.base.data.processor import MM15Processor
from mm15.base.data.packing import BatchedDataset, PackSpec, TokenBudget, TokenBudgetSampler, pack_collate
from mm15.base.training.resumable import ResumableLoader, ResumableSampler, accumulation_for
from mm15.base.data.sample import Sample, SampleError, Skip
from mm15.base.data.drawn import TrainDraws, is_sharded
from mm15.base.data.mixtures import Mixture
from mm15.base.data.sources import MediaEscape, SampleSource, resolve_media_path

log = logging.getLogger(__name__)


class DataErrorBudgetExceeded(RuntimeError):
    pass


class Quarantine:
    """Counts skips, appends them to a JSONL file and enforces the error budget.

    Under DDP/FSDP each rank loads other batches, so the budget counts every rank's: `record(...,
    across_ranks=True)` (once per batch on every rank) all-reduces the batch counts, and all ranks
    stop at the same batch with one summary instead of one rank stopping while the others wait.
    Counts from reading the sources (the same on every rank) are not reduced."""

    def __init__(self, path: str | Path | None, max_error_fraction: float, min_samples: int):
        self.path = Path(path) if path else None
        self.max_error_fraction = max_error_fraction
        self.min_samples = min_samples
        self.seen = 0
        self.skips: list[Skip] = []
        self.batch_seen = 0  # the part of `seen` / `skips` from this rank's batches
        self.batch_skips: list[Skip] = []

    def record(self, skips: Iterable[Skip], seen: int, across_ranks: bool = False) -> None:
        skips = list(skips)
        self.seen += seen
        for s in skips:
            log.warning("skipped %s record %s (%s): %s", s.stage, s.record_id, s.source, s.reason)
        self.skips.extend(skips)
        if across_ranks:
            self.batch_seen += seen
            self.batch_skips.extend(skips)
        if skips and self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                for s in skips:
                    f.write(json.dumps(s.__dict__) + "\n")
        self.check(across_ranks)

    def check(self, across_ranks: bool = False) -> None:
        seen, skipped = self.totals(across_ranks)  # a collective: before any early return
        if seen < self.min_samples or not skipped:
            return
        if skipped / seen > self.max_error_fraction:
            raise DataErrorBudgetExceeded(self.summary(seen, skipped, across_ranks))

    def totals(self, across_ranks: bool = False) -> tuple[int, int]:
        """(seen, skipped), with every rank's batches when `across_ranks` and running distributed."""
        seen, skipped = self.seen, len(self.skips)
        if across_ranks and _distributed():
            counts = torch.tensor([self.batch_seen, len(self.batch_skips)], dtype=torch.long, device=_collective_device())
            torch.distributed.all_reduce(counts)
            seen += int(counts[0]) - self.batch_seen
            skipped += int(counts[1]) - len(self.batch_skips)
        return seen, skipped

    def summary(self, seen: int | None = None, skipped: int | None = None, across_ranks: bool = False) -> str:
        seen = self.seen if seen is None else seen
        skipped = len(self.skips) if skipped is None else skipped
        reasons = collections.Counter(_reason(s) for s in self.skips)
        examples = [f"{s.source}: record {s.record_id}: {s.reason}" for s in self.skips[:3]]
        if across_ranks and _distributed():  # every rank is here: gather the other ranks' batch skips
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            mine = [f"{s.source}: record {s.record_id}: {s.reason}" for s in self.batch_skips[:3]]
            torch.distributed.all_gather_object(parts, (collections.Counter(_reason(s) for s in self.batch_skips), mine))
            reasons -= parts[torch.distributed.get_rank()][0]  # what every rank read alike, counted once
            for part_reasons, part_examples in parts:
                reasons += part_reasons
                examples += [e for e in part_examples if e not in examples]
        lines = [f"{skipped} of {seen} samples skipped "
                 f"({skipped / max(seen, 1):.1%} > budget {self.max_error_fraction:.1%}); "
                 f"details in {self.path or '(no quarantine file)'}"]
        lines += [f"  {n:5d} x {reason}" for reason, n in reasons.most_common(10)]
        lines += [f"  e.g. {example}" for example in examples[:3]]
        return "\n".join(lines)


def _reason(skip: Skip) -> str:
    return skip.reason.split(":")[0][:80]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _collective_device() -> torch.device:
    """Where a tensor for a collective must live: NCCL reduces CUDA tensors only."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_media(sample: Sample, root: str | None) -> Sample:
    """Make media paths absolute under `root`; a path escaping the root (`..`, or absolute
    elsewhere) is refused (`mm15.base.data.sources.resolve_media_path`: lexical, no file-system call)."""
    if root is None:
        return sample
    for m in sample.media:
        try:
            m.path = resolve_media_path(m.path, root)
        except MediaEscape as e:
            raise sample.error(str(e)) from None
    return sample


class ProcessedDataset(Dataset):
    """Samples processed on access (in loader workers); failures become `Skip`s.

    `cache=True` keeps each processed sample (tensors or `Skip`) after its first access, in the
    process that made it: later epochs skip decoding, splitting and templating. The processor is
    deterministic per sample (the referring draw is seeded by the sample id), so a cached epoch is the
    same as a recomputed one. For data that fits in memory (the demos); off by default."""

    def __init__(self, samples: list[Sample], processor: MM15Processor, generate: bool, cache: bool = False):
        self.samples = samples
        self.processor = processor
        self.generate = generate
        self.cache: dict[int, dict[str, Any] | Skip] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any] | Skip:
        if self.cache is None:
            return self.process(i)
        if i not in self.cache:
            self.cache[i] = self.process(i)
        return self.cache[i]

    def process(self, i: int) -> dict[str, Any] | Skip:
        item = process_sample(self.processor, self.samples[i], self.generate)
        if not isinstance(item, Skip):
            item["index"] = i  # the sample's position: records de-duplicate on it (`MM15Module._gather`)
        return item


def process_sample(processor: MM15Processor, sample: Sample, generate: bool = False) -> dict[str, Any] | Skip:
    """The processed sample, or the `Skip` saying why it cannot be used.

    Only data errors become skips: `SampleError` (the loaders convert what bad files raise, e.g.
    `load_rgb`, the video decoder) and `OSError` (a file that cannot be read, PIL's
    `UnidentifiedImageError` included). Anything else (TypeError, KeyError, ...) is a bug in the
    code and propagates rather than being counted as a bad sample."""
    try:
        return processor(sample, generate=generate)
    except SampleError as e:
        return e.as_skip("load")
    except OSError as e:  # a bad or unreadable file: recorded and budgeted
        return Skip(sample.id, sample.source, f"{type(e).__name__}: {e}", "load")


class MM15DataModule(pl.LightningDataModule):
    """Args:
    train, val, test, predict: lists of sources (`class_path` in YAML); `train` may also be a
        `mm15.base.data.mixtures.Mixture`. A mixture, or a list holding prepared shards
        (`mm15.base.data.streams.ShardedSource`, drawn in proportion to the sources' sizes), is
        streamed (`mm15.base.data.drawn.TrainDraws`); a list of in-memory sources is concatenated.
    media_root: where relative media paths live, for sources without their own `media_root`.
    batch_size: per-device micro-batch for training; `eval_batch_size` for val/test/predict.
    num_workers: loader processes (media decoding and splitting run there).
    max_error_fraction, min_samples_for_budget: the error budget (see module docstring).
    quarantine_file: default `<trainer.default_root_dir>/quarantine.jsonl`.
    seed: shuffling seed of the training order (`mm15.base.training.resumable.ResumableSampler`).
    global_batch_size: samples per optimizer step over all processes; sets the trainer's gradient
        accumulation to `global_batch_size / (batch_size * world_size)` (None: keep the trainer's).
    cache_processed: keep processed samples in memory after their first epoch (`ProcessedDataset`;
        for data that fits in RAM).
    lanes: independent draw sequences of a streamed training split; a rank reads only its lanes'
        data when `lanes` is a multiple of the process count (the order depends on `lanes`, never
        on the process count).
    packing: pack each training and validation micro-batch into rows of at most
        `packing.max_tokens` tokens instead of padding it (`mm15.base.data.packing`); the loss is
        the padded batch's. Test and predict (generation) batches stay padded.
    token_budget: size training micro-batches by tokens instead of `batch_size` samples
        (length-grouped, `mm15.base.data.packing.TokenBudgetSampler`); in-memory training data
        only. The global batch then counts tokens: `global_batch_size` is refused with it.
    """

    def __init__(self, train: list[SampleSource] | Mixture | None = None, val: list[SampleSource] | None = None,
                 test: list[SampleSource] | None = None, predict: list[SampleSource] | None = None,
                 media_root: str | None = None, batch_size: int = 8, eval_batch_size: int | None = None,
                 num_workers: int = 0, max_error_fraction: float = 0.05, min_samples_for_budget: int = 20,
                 quarantine_file: str | None = None, seed: int = 0, global_batch_size: int | None = None,
                 cache_processed: bool = False, lanes: int = 1, packing: PackSpec | None = None,
                 token_budget: TokenBudget | None = None):
        super().__init__()
        if token_budget is not None and (global_batch_size or isinstance(train, Mixture)):
            raise ValueError("data.token_budget sizes micro-batches by tokens: it cannot be combined with "
                             "global_batch_size (samples per step) nor with a mixture (drawn in samples); "
                             "set trainer.accumulate_grad_batches for more tokens per step")
        self.packing = packing
        self.token_budget = token_budget
        self.mixture = train if isinstance(train, Mixture) else None
        if self.mixture is not None:
            train = [entry.source for entry in self.mixture.entries]
        self.lanes = lanes
        self.draws: TrainDraws | None = None
        self.sources = {"train": train or [], "val": val or [], "test": test or [], "predict": predict or []}
        self.media_root = media_root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.cache_processed = cache_processed
        self.train_sampler: ResumableSampler | TokenBudgetSampler | None = None
        self.quarantine = Quarantine(quarantine_file, max_error_fraction, min_samples_for_budget)
        self.samples: dict[str, list[Sample]] = {}
        self.processor: MM15Processor | None = None

    def prepare_data(self) -> None:
        for sources in self.sources.values():
            for source in sources:
                if hasattr(source, "prepare"):
                    source.prepare()

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.processor = self.trainer.lightning_module.processor
            if self.quarantine.path is None:
                self.quarantine.path = Path(self.trainer.default_root_dir) / "quarantine.jsonl"
        if stage == "fit" and self.trainer is not None and self.global_batch_size:
            self._derive_accumulation()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[stage]
        for split in wanted:
            if split == "train" and (self.mixture is not None or any(is_sharded(s) for s in self.sources["train"])):
                if self.draws is None:
                    self.draws = TrainDraws(self.mixture or self.sources["train"], self, self.lanes)
            elif split not in self.samples:
                self.samples[split] = self.read_split(split)

    def _derive_accumulation(self) -> None:
        steps = accumulation_for(self.global_batch_size, self.batch_size, self.trainer.world_size)
        if self.trainer.accumulate_grad_batches not in (1, steps):
            raise ValueError(f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} contradicts "
                             f"data.global_batch_size={self.global_batch_size} (which needs {steps}); set only one")
        self.trainer.accumulate_grad_batches = steps

    def read_source(self, source: SampleSource) -> tuple[list[Sample], list[Skip]]:
        """One source's usable samples (media resolved) and its skips."""
        samples, skips = [], []
        root = getattr(source, "media_root", None) or self.media_root
        for item in source.read():
            if isinstance(item, Skip):
                skips.append(item)
                continue
            try:
                samples.append(resolve_media(item, root))
            except SampleError as e:
                skips.append(e.as_skip("parse"))
        return samples, skips

    def read_split(self, split: str) -> list[Sample]:
        samples, skips = [], []
        for source in self.sources[split]:
            got, lost = self.read_source(source)
            samples += got
            skips += lost
        self.quarantine.record(skips, seen=len(samples) + len(skips))
        if self.sources[split] and not samples:
            raise DataErrorBudgetExceeded(f"{split}: no usable samples\n{self.quarantine.summary()}")
        log.info("%s: %d samples, %d skipped while reading", split, len(samples), len(skips))
        return samples

    def _dataset(self, split: str, generate: bool) -> ProcessedDataset:
        if self.processor is None:
            raise RuntimeError("the data module needs a processor: run it through a Trainer with an MM15Module")
        return ProcessedDataset(self.samples[split], self.processor, generate, cache=self.cache_processed)

    def collate_fn(self, generate: bool = False) -> Any:
        """The batch builder: packed rows for training and validation when `packing` is set,
        padded rows otherwise (left-padded prompts for generation)."""
        if self.packing is not None and not generate:
            return functools.partial(pack_collate, spec=self.packing, pad_token_id=self.processor.tokenizer.pad_token_id)
        return functools.partial(self.processor.collate, padding_side="left" if generate else "right")

    def _loader(self, split: str, shuffle: bool, generate: bool) -> DataLoader:
        """Validation, test and predict batches. Under DDP/FSDP every rank must run the same number
        of batches (FSDP2 gathers in every forward; the skip budget all-reduces per batch), so the
        sampler is a padding `DistributedSampler`: the last round repeats the first samples, whose
        records `MM15Module` drops by dataset index. (Lightning would give `predict` a sampler that
        does not pad, and a rank with one batch fewer leaves the others waiting.)"""
        dataset = self._dataset(split, generate)
        generator = torch.Generator().manual_seed(self.seed)
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=self.seed, **kwargs) if kwargs else None
        return DataLoader(
            dataset, batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle if sampler is None else False, sampler=sampler,
            num_workers=self.num_workers, collate_fn=self.collate_fn(generate),
            generator=generator, persistent_workers=self.num_workers > 0,
        )

    def sample_lengths(self, split: str = "train") -> list[int]:
        """Tokens of each sample of `split` as processed, counted from media headers (`TokenCounter`);
        a sample the counter cannot measure counts 1 (the loader records its skip when it is read)."""
        from mm15.base.data.plan import TokenCounter

        counter = TokenCounter(self.processor)
        lengths = []
        for sample in self.samples[split]:
            try:
                lengths.append(counter(sample)[0])
            except (SampleError, OSError):
                lengths.append(1)
        return lengths

    def train_dataloader(self) -> DataLoader:
        """Resumable, world-size-invariant order (see `mm15.base.training.resumable`)."""
        if self.draws is not None:
            loader = self.draws.loader()
            self.train_sampler = loader.dataset  # holds the data position, as the sampler does
            return loader
        dataset = self._dataset("train", generate=False)
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        if self.token_budget is not None:
            self.train_sampler = TokenBudgetSampler(self.sample_lengths("train"), self.token_budget, self.packing,
                                                    seed=self.seed, **(kwargs or {}))
            return ResumableLoader(  # batch_size=None: each sampler element is a whole micro-batch
                BatchedDataset(dataset), batch_size=None, sampler=self.train_sampler, num_workers=self.num_workers,
                collate_fn=self.collate_fn(), persistent_workers=self.num_workers > 0,
            )
        self.train_sampler = ResumableSampler(dataset, self.batch_size, seed=self.seed, **(kwargs or {}))
        return ResumableLoader(
            dataset, batch_size=self.batch_size, sampler=self.train_sampler, num_workers=self.num_workers,
            collate_fn=self.collate_fn(), persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, generate=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, generate=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False, generate=True)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Main process: record the skips the workers produced and enforce the budget."""
        if self.train_sampler is not None and self.trainer is not None and self.trainer.training:
            self.train_sampler.note_batch()  # the data position saved with checkpoints
            if self.draws is not None:
                self.draws.log_draws()
        skipped = batch.pop("skipped", [])
        self.quarantine.record(skipped, seen=batch.get("size", 0) + len(skipped), across_ranks=True)  # every rank, every batch
        return batch
