"""Padding-free batches: packed rows, and micro-batches sized by a token budget.

Packing (`PackSpec`, `pack_collate`): the samples of a micro-batch are concatenated into rows of at
most `max_tokens` tokens, chosen first-fit or best-fit decreasing, instead of each being padded to
the longest one; the rows are then made as short as their number allows (`balanced_rows`). A
sample (its text and all its media placeholders) is never split across rows. Each row carries
`position_ids` that restart at 0 at every sample, and `sample_index` (the sample of every token,
-1 for the padding at the end of a row). The model passes `position_ids` with no 2-D attention
mask to the LLM, whose mask code (transformers' packed-sequence detection) then keeps attention
inside each sample: a block-diagonal causal mask with SDPA / eager / flex attention,
variable-length kernels with flash-attention, one SDPA call per sample with `packed_sdpa`
(`mm15.base.attention`). The loss groups targets by
`sample_index`, so `token` and `sample` reductions, the MoE load-balancing and z-losses (over the
real tokens) equal those of the padded batch (`tests/test_packing.py`). Generation batches are
never packed.

Token budget (`TokenBudgetSampler`): length-grouped micro-batches whose cost stays near
`max_tokens` while the number of samples varies. Sample lengths come from the planner's header-only
count (`mm15.base.data.plan.TokenCounter`), equal to the processed `len(input_ids)`. The cost of a
micro-batch is `len(batch) * longest` when padded, or the rows first-fit decreasing needs times
`max_tokens` when packed. With a token budget, a step holds a varying number of samples: the
global batch counts tokens (budget x processes x accumulation), not samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler

from mm15.base.data.processor import add_samples, start_batch
from mm15.base.data.sample import IGNORE_INDEX, Skip
from mm15.base.training.resumable import ConsumedBatches

Fit = Literal["first", "best"]


@dataclass
class PackSpec:
    """Args:
    max_tokens: tokens per packed row (a sample longer than this gets a row of its own).
    fit: `first` (first-fit decreasing) or `best` (best-fit decreasing: the fullest row that fits).
    """

    max_tokens: int = 2048
    fit: Fit = "first"

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"packing.max_tokens must be >= 1, got {self.max_tokens}")
        if self.fit not in ("first", "best"):
            raise ValueError(f"packing.fit must be 'first' or 'best', got {self.fit!r}")


def pack_lengths(lengths: Sequence[int], capacity: int, fit: Fit = "first") -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to <= `capacity` (an over-long item alone),
    placed longest first. Within a bin the indices keep their input order; bins are ordered by
    their first index, so a shuffled input gives shuffled rows."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        fits = [b for b, room in enumerate(free) if room >= n]
        if not fits:
            bins.append([i])
            free.append(capacity - n)
            continue
        b = fits[0] if fit == "first" else min(fits, key=lambda k: free[k])
        bins[b].append(i)
        free[b] -= n
    for b in bins:
        b.sort()
    return sorted(bins, key=lambda b: b[0])


def balanced_rows(lengths: Sequence[int], spec: PackSpec) -> list[list[int]]:
    """`pack_lengths` at `spec.max_tokens`, then at the smallest capacity (not below the longest
    sample) that still needs no more rows: the same number of rows, each as short as it can be, so
    the padding after the fullest row and the attention span (quadratic for a dense mask) shrink."""
    bins = pack_lengths(lengths, spec.max_tokens, spec.fit)
    low, high = max(max(lengths), -(-sum(lengths) // len(bins))), spec.max_tokens
    while low < high:
        mid = (low + high) // 2
        trial = pack_lengths(lengths, mid, spec.fit)
        if len(trial) <= len(bins):
            bins, high = trial, mid
        else:
            low = mid + 1
    return bins


def pack_collate(items: list[dict[str, Any] | Skip], spec: PackSpec, pad_token_id: int) -> dict[str, Any]:
    """A micro-batch of processed samples -> packed rows (see the module docstring).

    Keys as `MM15Processor.collate` (`input_ids`, `labels`, `attention_mask` of the real tokens,
    `pixel_values`, the per-sample lists), plus `position_ids` and `sample_index` (R, L), and
    `rows`. Samples, their crops and their per-sample entries are in row order, so media features
    meet their placeholders in the order the model splices them. The first token of every sample
    carries no target (its predecessor belongs to another sample)."""
    batch, items = start_batch(items)
    if not items:
        return batch
    rows = [[items[i] for i in b] for b in balanced_rows([len(x["input_ids"]) for x in items], spec)]
    shape = (len(rows), max(sum(len(x["input_ids"]) for x in row) for row in rows))
    ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    sample_index = torch.full(shape, -1, dtype=torch.long)
    k = 0
    for r, row in enumerate(rows):
        start = 0
        for x in row:
            n = len(x["input_ids"])
            cols = slice(start, start + n)
            ids[r, cols], labels[r, cols], mask[r, cols] = torch.as_tensor(x["input_ids"]), torch.as_tensor(x["labels"]), 1
            labels[r, start] = IGNORE_INDEX
            positions[r, cols] = torch.arange(n)
            sample_index[r, cols] = k
            start += n
            k += 1
        positions[r, start:] = torch.arange(shape[1] - start)  # the padding: a sequence of its own
    batch.update(input_ids=ids, labels=labels, attention_mask=mask, position_ids=positions, sample_index=sample_index,
                 rows=len(rows))
    return add_samples(batch, [x for row in rows for x in row])


# ----- token-budget micro-batches ---------------------------------------------------------------------
@dataclass
class TokenBudget:
    """Args:
    max_tokens: the cost a micro-batch may reach (padded: samples x longest; packed: rows x
        `packing.max_tokens`). A sample costing more than this alone gets a micro-batch of its own.
    buffer: samples (of the shuffled order) grouped by length at a time: larger buffers fill
        micro-batches more evenly, smaller ones keep the order closer to random.
    """

    max_tokens: int = 8192
    buffer: int = 1024

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.buffer < 1:
            raise ValueError(f"token budget needs max_tokens >= 1 and buffer >= 1, got {self.max_tokens}, {self.buffer}")


def budget_batches(lengths: Sequence[int], order: Sequence[int], budget: TokenBudget,
                   packing: PackSpec | None = None) -> list[list[int]]:
    """Micro-batches (lists of indices into `lengths`) from `order`, a buffer at a time: the buffer
    sorted by length, then cut greedily where the next sample would exceed the budget."""
    batches: list[list[int]] = []
    for s in range(0, len(order), budget.buffer):
        chunk = sorted(order[s:s + budget.buffer], key=lambda i: lengths[i])
        current: list[int] = []
        for i in chunk:
            if current and _cost([lengths[j] for j in current + [i]], packing) > budget.max_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    return batches


def _cost(lengths: list[int], packing: PackSpec | None) -> int:
    if packing is None:
        return len(lengths) * max(lengths)
    if max(lengths) > packing.max_tokens:
        return math.inf  # type: ignore[return-value]  # an over-long sample stands alone
    return len(pack_lengths(lengths, packing.max_tokens, packing.fit)) * packing.max_tokens


class TokenBudgetSampler(ConsumedBatches, DistributedSampler):
    """Yields micro-batches (lists of dataset indices) under a token budget, for a `DataLoader`
    with `batch_size=None` over `BatchedDataset` (a `DistributedSampler`, so Lightning keeps it).

    Every rank computes the same micro-batches from `seed + epoch` and takes every
    `num_replicas`-th, from a list cut to a multiple of `num_replicas` (the same number of steps on
    every rank). The micro-batch order is shuffled after grouping, so lengths do not rise through
    the epoch. State for resuming: the epoch and the micro-batches consumed."""

    def __init__(self, lengths: Sequence[int], budget: TokenBudget, packing: PackSpec | None = None,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.lengths = list(lengths)
        self.budget = budget
        self.packing = packing
        self.consumed_batches = 0
        self._epoch_batches: tuple[int, list[list[int]]] | None = None

    def batches(self) -> list[list[int]]:
        """This rank's micro-batches of the current epoch."""
        if self._epoch_batches is None or self._epoch_batches[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.lengths), generator=g).tolist() if self.shuffle else list(range(len(self.lengths)))
            every = budget_batches(self.lengths, order, self.budget, self.packing)
            if self.shuffle:
                every = [every[i] for i in torch.randperm(len(every), generator=g).tolist()]
            used = len(every) // self.num_replicas * self.num_replicas
            self._epoch_batches = (self.epoch, every[:used][self.rank::self.num_replicas])
        return self._epoch_batches[1]

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        return iter(self.batches()[self.consumed_batches:])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed_batches": self.consumed_batches, "seed": self.seed,
                "dataset_size": len(self.lengths), "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, now in (("dataset_size", len(self.lengths)), ("seed", self.seed), ("num_replicas", self.num_replicas)):
            if state.get(key, now) != now:
                raise ValueError(f"cannot resume the data position: the checkpoint's token-budget batches had "
                                 f"{key}={state[key]!r}, this run has {now!r}. Resume with the same data and process "
                                 "count, or start a new run.")
        self.epoch = int(state["epoch"])
        self.consumed_batches = int(state["consumed_batches"])


class BatchedDataset(Dataset):
    """`dataset[list of indices]` -> the list of those items: the whole micro-batch is read in one
    loader worker, as the sampler chose it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, indices: list[int]) -> list[Any]:
        return [self.dataset[i] for i in indices]
