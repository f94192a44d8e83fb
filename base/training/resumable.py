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

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
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

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed_batches = 0
        super().set_epoch(epoch)

    def note_batch(self) -> None:
        self.consumed_batches += 1

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
        consumed = int(state["consumed_samples"])
        if consumed % self.samples_per_round:
            raise ValueError(
                f"cannot resume the data position: {consumed} samples were consumed, not a multiple of micro-batch "
                f"{self.micro_batch} x {self.num_replicas} processes. Resume with a batch size and process count "
                "whose product divides it (the global batch size may stay the same)."
            )
        self.epoch = int(state["epoch"])
        self.consumed_batches = consumed // self.samples_per_round


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
