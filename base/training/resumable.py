"""Training-data order that survives restarts and does not depend on the number of processes.

`ResumableSampler` shuffles with `seed + epoch`, cuts the permutation into micro-batches and deals
them to ranks in turn: with micro-batch m and W ranks, optimizer step s of a run with global batch
G = m * W * accumulation sees the same G samples whatever W is. So a 2-process run reproduces a
1-process run with twice the gradient accumulation, sample for sample.

It counts the micro-batches handed to the training step (`note_batch`, called by the data
module), and `ResumableLoader.state_dict()` (saved by Lightning in every checkpoint, as for any
stateful loader) records how many samples of the epoch were consumed. On resume the sampler
starts right after them: no sample is read twice, none is skipped.

    sampler = ResumableSampler(dataset, micro_batch=8, num_replicas=world, rank=rank, seed=0)
    loader = ResumableLoader(dataset, batch_size=8, sampler=sampler, collate_fn=...)
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info


class ConsumedBatches:
    """The data position of a resumable sampler: micro-batches of `self.epoch` already handed to
    the training step (`note_batch`), reset when the epoch changes. Mixed into `DistributedSampler`s."""

    consumed_batches: int = 0
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed_batches = 0
        super().set_epoch(epoch)  # type: ignore[misc]

    def note_batch(self) -> None:
        self.consumed_batches += 1


class ResumableSampler(ConsumedBatches, DistributedSampler):
    """A `DistributedSampler` (so Lightning does not replace it) dealing micro-batches to ranks.

    Each epoch uses `len(dataset) // (micro_batch * num_replicas)` micro-batches per rank; the few
    samples left over change with the shuffle from epoch to epoch."""

    def __init__(self, dataset: Dataset, micro_batch: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.micro_batch = micro_batch
        self.size = len(dataset)  # type: ignore[arg-type]
        self.batches_per_rank = self.size // (micro_batch * num_replicas)
        self.consumed_batches = 0  # micro-batches of `self.epoch` already used, on every rank

    def __len__(self) -> int:
        return self.batches_per_rank * self.micro_batch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        used = self.batches_per_rank * self.num_replicas * self.micro_batch
        mine = order[:used].view(self.batches_per_rank, self.num_replicas, self.micro_batch)[:, self.rank]
        start = self.consumed_batches  # > 0 only right after a resume
        return iter(mine[start:].reshape(-1).tolist())

    # ----- checkpoint state ------------------------------------------------------------------------
    @property
    def samples_per_round(self) -> int:
        """Samples consumed by all ranks for one micro-batch each."""
        return self.micro_batch * self.num_replicas

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed_samples": self.consumed_batches * self.samples_per_round,
                "seed": self.seed, "dataset_size": self.size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, now in (("dataset_size", self.size), ("seed", self.seed), ("shuffle", self.shuffle)):
            if state.get(key, now) != now:
                raise ValueError(
                    f"cannot resume the data position: the checkpoint's training data had {key}={state[key]!r}, this "
                    f"run has {now!r}. Resume with the data config the checkpoint was trained with, or start a new run."
                )
        self.epoch = int(state["epoch"])
        self.consumed_batches = consumed_rounds(int(state["consumed_samples"]), self.micro_batch, self.num_replicas)


def consumed_rounds(consumed: int, micro_batch: int, num_replicas: int) -> int:
    """Micro-batches per rank behind `consumed` samples of all ranks; refused when they do not divide."""
    if consumed % (micro_batch * num_replicas):
        raise ValueError(
            f"cannot resume the data position: {consumed} samples were consumed, not a multiple of micro-batch "
            f"{micro_batch} x {num_replicas} processes. Resume with a batch size and process count "
            "whose product divides it (the global batch size may stay the same)."
        )
    return consumed // (micro_batch * num_replicas)


class ResumableLoader(DataLoader):
    """A `DataLoader` Lightning treats as stateful: its state is its `ResumableSampler`'s."""

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def accumulation_for(global_batch_size: int, micro_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps that make `micro_batch * world_size * steps == global_batch_size`."""
    per_round = micro_batch * world_size
    if global_batch_size % per_round:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a multiple of batch_size {micro_batch} x {world_size} "
            f"processes = {per_round}; change data.init_args.global_batch_size or batch_size (e.g. global "
            f"{max(1, round(global_batch_size / per_round)) * per_round})"
        )
    return global_batch_size // per_round


# ----- mixtures and streams: an order of draws instead of a permutation -------------------------------
class RecordSet(Protocol):
    """The records of one source as the draw order sees them (in memory, `MemoryRecords`; sharded,
    `mm15.base.data.streams.ShardRecords`): `refs` yields cheap references in the order of one lane,
    pass after pass (each pass reshuffled); `load` turns the references a rank keeps into samples."""

    def lane_size(self, lane: int, lanes: int) -> int: ...

    def refs(self, epoch: int, source: int, lane: int, lanes: int, start: int, seed: int) -> Iterator[Any]: ...

    def load(self, ref: Any) -> Any: ...


class MemoryRecords:
    """A list of samples (already curated) restricted to `keep` (a cap's subset; None: all)."""

    def __init__(self, samples: list[Any], keep: np.ndarray | None = None):
        self.samples = samples
        self.index = np.arange(len(samples)) if keep is None else np.asarray(keep)

    def lane_size(self, lane: int, lanes: int) -> int:
        return len(self.index[lane::lanes])

    def refs(self, epoch: int, source: int, lane: int, lanes: int, start: int, seed: int) -> Iterator[int]:
        from mm15.base.data.mixtures import order_key

        mine = self.index[lane::lanes]
        passes, offset = divmod(start, len(mine))
        while True:
            perm = torch.randperm(len(mine), generator=torch.Generator().manual_seed(
                order_key(seed, epoch, source, lane, passes, 0))).numpy()
            yield from mine[perm[offset:]].tolist()
            passes, offset = passes + 1, 0

    def load(self, ref: int) -> Any:
        return self.samples[ref]


class _LaneCursor:
    """One lane's draws in order, for one loader process: skips what other ranks and workers take."""

    def __init__(self, stream: "DrawStream", lane: int, start: int):
        self.stream, self.lane, self.position = stream, lane, start
        self.begin = stream.order.counts_before(stream.epoch, lane, start)
        self.iters: dict[int, Iterator[Any]] = {}

    def _next_ref(self, source: int) -> Any:
        if source not in self.iters:
            s = self.stream
            self.iters[source] = s.sources[source].refs(s.epoch, source, self.lane, s.order.lanes,
                                                        int(self.begin[source]), s.order.seed)
        return next(self.iters[source])

    def take(self, start: int, count: int) -> list[tuple[int, Any]]:
        order, epoch = self.stream.order, self.stream.epoch
        out = []
        for draw in range(self.position, start + count):
            source = int(order.labels(epoch, self.lane, draw // order.block)[draw % order.block])
            ref = self._next_ref(source)
            if draw >= start:
                out.append((source, ref))
        self.position = start + count
        return out


class DrawStream(IterableDataset):
    """The training stream of a mixture (or of sharded sources): processed samples of this rank.

    Draw d of lane c comes from the source `order` names for it and is that source's next record
    in lane c. The epoch's micro-batches are numbered globally, j = 0, 1, ...: micro-batch j is the
    (j // lanes)-th run of `micro_batch` draws of lane j % lanes, and goes to rank j % world_size,
    as `ResumableSampler` deals them. Nothing depends on the world size: a rank reads only the
    lanes its micro-batches come from (with lanes a multiple of the process count, 1 / world_size
    of the data) and skips the draws it does not keep without processing them. Loader workers take
    the rank's micro-batches in turn. The position (`state_dict`) is the count of micro-batches
    consumed, as for `ResumableSampler`: on resume each lane restarts at its draw, each source at
    its record (`DrawOrder.counts_before`), and nothing is read twice or skipped.

    Args:
        sources: one `RecordSet` per source; names: their names (logged, put on each item).
        order: the `mm15.base.data.mixtures.DrawOrder`; epoch_draws: draws per epoch.
        process: (sample) -> processed item or Skip (the processor, with its errors caught).
        fingerprint: what must match on resume (shares, sizes, ...).
    """

    def __init__(self, sources: list[RecordSet], names: list[str], order: Any, epoch_draws: int, micro_batch: int,
                 process: Any, num_replicas: int = 1, rank: int = 0, fingerprint: dict[str, Any] | None = None):
        self.sources, self.names, self.order, self.process = sources, names, order, process
        self.micro_batch, self.num_replicas, self.rank = micro_batch, num_replicas, rank
        self.epoch_draws = epoch_draws
        self.batches_per_rank = (epoch_draws // micro_batch) // num_replicas
        self.epoch, self.consumed_batches = 0, 0
        self.fingerprint = fingerprint or {}
        if self.batches_per_rank == 0:
            raise ValueError(f"an epoch of {epoch_draws} draws holds no micro-batch of {micro_batch} for each of "
                             f"{num_replicas} processes")

    def __len__(self) -> int:
        return self.batches_per_rank * self.micro_batch

    samples_per_round = ResumableSampler.samples_per_round

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed_batches = 0
        self.epoch = epoch

    def note_batch(self) -> None:
        self.consumed_batches += 1

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cursors: dict[int, _LaneCursor] = {}
        lanes, m = self.order.lanes, self.micro_batch
        for k in range(self.consumed_batches, self.batches_per_rank):
            if (k - self.consumed_batches) % workers != worker:
                continue
            j = k * self.num_replicas + self.rank
            lane, start = j % lanes, (j // lanes) * m
            if lane not in cursors:
                cursors[lane] = _LaneCursor(self, lane, start)
            for source, ref in cursors[lane].take(start, m):
                item = self.process(self.sources[source].load(ref))
                if isinstance(item, dict):
                    item["mixture_source"] = self.names[source]
                yield item

    def draws_by_source(self) -> dict[str, int]:
        """Draws each source gave in this epoch so far, over all ranks (from the position alone)."""
        done = self.consumed_batches * self.num_replicas  # global micro-batches consumed
        lanes, total = self.order.lanes, np.zeros(len(self.sources), np.int64)
        for lane in range(lanes):
            runs = len(range(lane, done, lanes))
            total += self.order.counts_before(self.epoch, lane, runs * self.micro_batch)
        return dict(zip(self.names, total.tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed_samples": self.consumed_batches * self.samples_per_round,
                "seed": self.order.seed, "lanes": self.order.lanes, "num_replicas": self.num_replicas,
                **self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = {"seed": self.order.seed, "lanes": self.order.lanes, **self.fingerprint}
        for key, value in now.items():
            if state.get(key, value) != value:
                raise ValueError(f"cannot resume the data position: the checkpoint's training data had {key}="
                                 f"{state[key]!r}, this run has {value!r}. Resume with the data config the checkpoint "
                                 "was trained with, or start a new run.")
        if state.get("num_replicas", self.num_replicas) != self.num_replicas and state["consumed_samples"]:
            raise ValueError(f"cannot resume the data position: the checkpoint was written by {state['num_replicas']} "
                             f"processes, this run has {self.num_replicas}. The order of draws is the same at any "
                             "process count, but Lightning counts an epoch's batches per process in its own loop "
                             "state: resume with the same process count (or start a new run from the weights).")
        self.epoch = int(state["epoch"])
        self.consumed_batches = consumed_rounds(int(state["consumed_samples"]), self.micro_batch, self.num_replicas)


class DrawLoader(DataLoader):
    """A `DataLoader` over a `DrawStream`, stateful for Lightning like `ResumableLoader`; each
    iteration (epoch) first takes the trainer's epoch (`epoch_fn`), as Lightning's `set_epoch` does
    for samplers. Its workers are not persistent, so every epoch starts them at the stream's state."""

    def __init__(self, stream: DrawStream, epoch_fn: Any = None, **kwargs: Any):
        super().__init__(stream, batch_size=stream.micro_batch, persistent_workers=False, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self) -> Any:
        if self.epoch_fn is not None:
            self.dataset.set_epoch(int(self.epoch_fn()))
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
