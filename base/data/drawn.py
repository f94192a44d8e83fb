"""The training split as draws: a `Mixture` (or a list holding prepared shards) -> a `DrawStream`.

Used by `MM15DataModule` when `train` is a `mm15.base.data.mixtures.Mixture` or lists a
`mm15.base.data.streams.ShardedSource`. Sharded sources are streamed; the others are read into
memory once (their skips recorded in the quarantine). Caps, prompts and task labels
(`SourceEntry`) apply to both. A plain list is a flat mixture weighed by the sources' sizes whose
epoch draws every record once in expectation (one sharded source: exactly once, in the order
`ResumableSampler` gives it in memory when it fits in one shuffle window).

At start-up it logs each source's records, share, draws per epoch and repetition factor; during
training it logs `data/draws/<source>` (draws so far this epoch, all ranks) to the trainer's logger.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from mm15.base.data.mixtures import DrawOrder, Mixture, SourceEntry, cap_subset, curate, default_name
from mm15.base.data.streams import ShardedSource, ShardRecords, processing_spec
from mm15.base.training.resumable import DrawLoader, DrawStream, MemoryRecords

if TYPE_CHECKING:
    from mm15.base.data.datamodule import MM15DataModule

log = logging.getLogger(__name__)


def is_sharded(source: object) -> bool:
    return isinstance(source, ShardedSource)


def as_mixture(train: Mixture | list[Any], sizes: list[int] | None = None) -> Mixture:
    """A plain list as a flat mixture weighed by size (each record once per epoch in expectation)."""
    if isinstance(train, Mixture):
        return train
    names = [default_name(source) for source in train]
    entries = [SourceEntry(source, name=name if names.count(name) == 1 else f"{i}:{name}")
               for i, (source, name) in enumerate(zip(train, names))]
    return Mixture(sources=entries, epoch_samples=max(1, sum(sizes or [1])), weigh_by="size")


def mixture_table(mixture: Mixture, sizes: list[int], raw_sizes: list[int]) -> list[dict[str, Any]]:
    """Per source: records (before and after its cap), share, expected draws per epoch, repetition."""
    shares = mixture.shares(sizes)
    epoch = mixture.epoch_size(shares, sizes)
    return [{"source": path, "records": raw, "kept": size, "share": float(share), "draws": float(share * epoch),
             "repetition": float(share * epoch / max(size, 1))}
            for path, raw, size, share in zip(mixture.paths, raw_sizes, sizes, shares)]


class TrainDraws:
    """The training split of one data module as records, shares and an order (see module docstring)."""

    def __init__(self, train: Mixture | list[Any], module: "MM15DataModule", lanes: int = 1):
        from mm15.base.data.datamodule import DataErrorBudgetExceeded

        self.module = module
        self.sources = [e.source for e in train.entries] if isinstance(train, Mixture) else list(train)
        sharded = module.processor is not None and any(is_sharded(s) for s in self.sources)
        spec = processing_spec(module.processor) if sharded else None
        loaded = [self._records_of(source, spec) for source in self.sources]
        raw = [n for _, n in loaded]
        self.mixture = as_mixture(train, raw)
        keeps = [cap_subset(n, e.cap, module.seed, e.name) for n, e in zip(raw, self.mixture.entries)]
        self.records = [self._curated(records, keep, entry)
                        for (records, _), keep, entry in zip(loaded, keeps, self.mixture.entries)]
        self.sizes = [n if keep is None else len(keep) for keep, n in zip(keeps, raw)]
        if not any(self.sizes):
            raise DataErrorBudgetExceeded(f"train: no usable samples\n{module.quarantine.summary()}")
        self.table = mixture_table(self.mixture, self.sizes, raw)
        self.shares = np.array([row["share"] for row in self.table])
        self.epoch_draws = self.mixture.epoch_size(self.shares, self.sizes)
        per_lane = -(-self.epoch_draws // lanes)  # a short epoch is one block: its draws hold the shares
        self.order = DrawOrder(self.shares, module.seed, lanes, block=min(4096, per_lane))
        for lane in range(lanes):
            for entry, records in zip(self.mixture.entries, self.records):
                if records.lane_size(lane, lanes) == 0:
                    raise ValueError(f"mixture: source {entry.name!r} has no records in lane {lane} of {lanes}")
        self.stream: DrawStream | None = None
        self._logged_batches = 0
        for row in self.table:
            log.info("train source %-40s %9d records (%d kept) share %.4f draws/epoch %.0f repetition %.2f",
                     row["source"], row["records"], row["kept"], row["share"], row["draws"], row["repetition"])

    def _records_of(self, source: Any, spec: dict[str, Any] | None) -> tuple[Any, int]:
        """(records, count): sharded sources checked and streamed, the others read into memory."""
        if is_sharded(source):
            source.check()
            if spec is not None:
                source.check_spec(spec)
            return source, len(source)
        samples, skips = self.module.read_source(source)
        self.module.quarantine.record(skips, seen=len(samples) + len(skips))
        return samples, len(samples)

    @staticmethod
    def _curated(records: Any, keep: np.ndarray | None, entry: SourceEntry) -> Any:
        if isinstance(records, ShardedSource):
            return ShardRecords(records, keep, functools.partial(curate, entry=entry))
        return MemoryRecords([curate(s, entry) for s in records], keep)

    def loader(self) -> DrawLoader:
        from mm15.base.data.datamodule import process_sample

        module, trainer = self.module, self.module.trainer
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer else None
        fingerprint = {"shares": [round(float(s), 9) for s in self.shares], "sizes": self.sizes,
                       "epoch_draws": self.epoch_draws}
        self.stream = DrawStream(self.records, [e.name for e in self.mixture.entries], self.order, self.epoch_draws,
                                 module.batch_size, functools.partial(process_sample, module.processor),
                                 fingerprint=fingerprint, **(kwargs or {}))
        epoch_fn = (lambda: trainer.current_epoch) if trainer is not None else None
        return DrawLoader(self.stream, epoch_fn, num_workers=module.num_workers,
                          collate_fn=module.collate_fn())

    def log_draws(self) -> None:
        """Every `log_every_n_steps` micro-batches: each source's draws this epoch, to the logger."""
        trainer = self.module.trainer
        self._logged_batches += 1
        every = max(1, getattr(trainer, "log_every_n_steps", 50) or 50)
        if self.stream is None or self._logged_batches % every or not trainer.is_global_zero or not trainer.logger:
            return
        draws = self.stream.draws_by_source()
        trainer.logger.log_metrics({f"data/draws/{k}": v for k, v in draws.items()}, step=trainer.global_step)
