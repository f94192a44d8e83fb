"""Weighted mixtures of sources and per-source curation (docs/reference.md, sections 6 and 7).

A mixture is a tree: groups hold sources and/or further groups, each with a weight. A node's share
is its weight over the sum of its siblings' weights, times its parent's share. MM1.5's SFT recipe
is three groups (single-image 0.8, multi-image 0.1, text-only 0.1) with categories inside
single-image drawn 1 : alpha against "general" (`reference: general`, whose weight stays 1).

    train:
      class_path: mm15.base.data.mixtures.Mixture
      init_args:
        epoch_samples: 100000               # or epoch_source: <a source name>
        groups:
          - name: single_image
            weight: 0.8
            reference: general               # the weights below are alphas relative to general
            groups:
              - {name: general, sources: [{name: llava, source: {class_path: ..., init_args: {...}}}]}
              - {name: science, weight: 0.1, sources: [...]}
          - {name: text_only, weight: 0.1, sources: [...]}

Per source (`SourceEntry`): `cap` keeps at most t records, a subset chosen by seed (Cambrian-1);
`prompt` adds a system turn (`prompt_as: system`) or appends an answer-format line to every user
turn (`question`, e.g. "Answer the question using a single word or phrase."); `task` relabels the
samples for the metrics. Inside a group, sources are drawn by their weights (`weigh_by: weight`,
default 1 each: uniform, as MM1.5's OCR continual pre-training) or by their sizes (`size`).

An epoch is `epoch_samples` draws, or as many as it takes to draw `epoch_source` once in full. A
source whose share of the epoch exceeds its size is repeated (its repetition factor is logged and
planned). The order of draws (`DrawOrder`) is a function of the seed only, so it is the same at any
world size and can be resumed at any draw: see `mm15.base.training.resumable.DrawStream`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from mm15.base.data.sample import Sample, Turn
from mm15.base.data.sources import SampleSource

log = logging.getLogger(__name__)


@dataclass
class SourceEntry:
    """One source of a mixture with its curation.

    Args:
        source: any `SampleSource` (`class_path` in YAML), sharded or read into memory.
        name: unique in the mixture (default: derived from the source's file or folder).
        weight: relative weight among the sources of its group (> 0).
        cap: keep at most this many records, chosen by the data seed (Cambrian-1's t); larger than
            the source: noted, everything kept.
        prompt: a system prompt or an answer-format line for every sample of this source.
        prompt_as: `system` (a system turn, unless the sample has one) or `question` (a new line at
            the end of every user turn, as LLaVA-1.5 does on short-answer VQA).
        task: task label for the metrics (default: the builder's).
    """

    source: SampleSource
    name: str | None = None
    weight: float = 1.0
    cap: int | None = None
    prompt: str | None = None
    prompt_as: Literal["system", "question"] = "question"
    task: str | None = None


@dataclass
class Group:
    """A weighted node of the mixture tree: sources, sub-groups or both.

    Args:
        name: shown in logs and the plan; unique among its siblings.
        weight: relative weight among its siblings (> 0).
        reference: the child whose weight is 1; the others' weights are then alphas relative to it.
        weigh_by: `weight` (the children's weights) or `size` (the sources' record counts).
    """

    name: str
    weight: float = 1.0
    reference: str | None = None
    weigh_by: Literal["weight", "size"] = "weight"
    sources: list[SourceEntry] = field(default_factory=list)
    groups: list["Group"] = field(default_factory=list)


def default_name(source: object) -> str:
    """`<file stem>` of the source's `path` / `shards` / `root` (plus `/<split>` when it has one)."""
    for attr in ("path", "shards", "root"):
        value = getattr(source, attr, None)
        if value:
            name = Path(str(value).rstrip("/")).stem
            split = getattr(source, "split", None)
            return f"{name}/{split}" if isinstance(split, str) and attr == "root" else name
    return type(source).__name__


def _check_weight(what: str, weight: float) -> None:
    if not weight > 0:  # also catches NaN
        raise ValueError(f"mixture: {what} has weight {weight}; weights must be > 0 (leave out what you do not want)")


class Mixture:
    """The training split as a weighted mixture (see the module docstring). Checked at start-up:
    weights > 0, no empty group, names unique, references and `epoch_source` naming something.

    Args:
        groups: the top-level groups.
        sources: top-level sources beside the groups (a flat mixture needs no group).
        epoch_samples: draws per epoch; or
        epoch_source: the name of the source one epoch draws once in full (exactly one of the two).
        weigh_by: how the top-level children are weighed (`weight` or `size`, as in `Group`).
    """

    def __init__(self, groups: list[Group] | None = None, sources: list[SourceEntry] | None = None,
                 epoch_samples: int | None = None, epoch_source: str | None = None,
                 weigh_by: Literal["weight", "size"] = "weight"):
        self.root = Group("mixture", 1.0, weigh_by=weigh_by, sources=list(sources or []), groups=list(groups or []))
        self.epoch_samples, self.epoch_source = epoch_samples, epoch_source
        self.entries: list[SourceEntry] = []
        self.paths: list[str] = []  # "single_image/general/llava" per entry
        self._collect(self.root, "")
        names = [e.name for e in self.entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"mixture: sources named {dupes} more than once; give each a unique `name`")
        if (epoch_samples is None) == (epoch_source is None):
            raise ValueError("mixture: give exactly one of epoch_samples (draws per epoch) or epoch_source "
                             "(the source one epoch draws once)")
        if epoch_samples is not None and epoch_samples <= 0:
            raise ValueError(f"mixture: epoch_samples must be > 0, got {epoch_samples}")
        if epoch_source is not None and epoch_source not in names:
            raise ValueError(f"mixture: epoch_source {epoch_source!r} names no source; sources: {names}")

    def _collect(self, group: Group, prefix: str) -> None:
        where = f"group {prefix + group.name!r}"
        if not group.sources and not group.groups:
            raise ValueError(f"mixture: {where} has no sources and no groups")
        children = [g.name for g in group.groups] + [e.name or default_name(e.source) for e in group.sources]
        if group.reference is not None:
            if group.reference not in children:
                raise ValueError(f"mixture: {where} names reference {group.reference!r}, not one of {children}")
            weight = next(c.weight for c in [*group.groups, *group.sources]
                          if (getattr(c, "name", None) or default_name(c.source)) == group.reference)
            if weight != 1.0:
                raise ValueError(f"mixture: {where}: the reference {group.reference!r} has weight {weight}; its "
                                 "weight is 1 by definition (the others are alphas relative to it)")
        path = "" if group is self.root else prefix + group.name + "/"
        for sub in group.groups:
            _check_weight(f"group {path + sub.name!r}", sub.weight)
            self._collect(sub, path)
        for entry in group.sources:
            entry.name = entry.name or default_name(entry.source)
            _check_weight(f"source {path + entry.name!r}", entry.weight)
            if entry.cap is not None and entry.cap <= 0:
                raise ValueError(f"mixture: source {entry.name!r} has cap {entry.cap}; a cap must be > 0")
            self.entries.append(entry)
            self.paths.append(path + entry.name)

    # ----- shares ------------------------------------------------------------------------------------
    def shares(self, sizes: list[int]) -> np.ndarray:
        """Each entry's share of the draws (sums to 1), given every entry's record count (after caps)."""
        size_of = dict(zip((id(e) for e in self.entries), sizes))
        out = {id(e): 0.0 for e in self.entries}

        def size(node: Group | SourceEntry) -> int:
            if isinstance(node, SourceEntry):
                return size_of[id(node)]
            return sum(size(c) for c in [*node.groups, *node.sources])

        def walk(group: Group, share: float) -> None:
            children = [*group.groups, *group.sources]
            weights = np.array([size(c) if group.weigh_by == "size" else c.weight for c in children], float)
            if weights.sum() <= 0:
                raise ValueError(f"mixture: group {group.name!r}: its sources hold no records")
            for child, w in zip(children, weights / weights.sum()):
                if isinstance(child, Group):
                    walk(child, share * w)
                else:
                    out[id(child)] = share * w

        walk(self.root, 1.0)
        return np.array([out[id(e)] for e in self.entries])

    def epoch_size(self, shares: np.ndarray, sizes: list[int]) -> int:
        """Draws per epoch."""
        if self.epoch_samples is not None:
            return int(self.epoch_samples)
        k = [e.name for e in self.entries].index(self.epoch_source)
        return int(round(sizes[k] / shares[k]))


# ----- curation ----------------------------------------------------------------------------------
def curate(sample: Sample, entry: SourceEntry) -> Sample:
    """The entry's task label and prompt applied to `sample` (in place; returned)."""
    if entry.task:
        sample.task = entry.task
    if entry.prompt:
        if entry.prompt_as == "system":
            if sample.turns[0].role != "system":
                sample.turns.insert(0, Turn("system", entry.prompt))
        else:
            for turn in sample.turns:
                if turn.role == "user":
                    turn.text = turn.text.rstrip() + "\n" + entry.prompt
    return sample


def stable_hash(text: str) -> int:
    """A 63-bit hash of `text`, the same in every process (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def cap_subset(size: int, cap: int | None, seed: int, name: str) -> np.ndarray | None:
    """Sorted indices of the records a cap keeps (None: all), the same for every epoch."""
    if cap is None or cap >= size:
        if cap is not None:
            log.warning("mixture: source %r has %d records, fewer than its cap %d: all kept", name, size, cap)
        return None
    rng = np.random.default_rng([seed, stable_hash("cap:" + name)])
    return np.sort(rng.choice(size, size=cap, replace=False, shuffle=False))


# ----- the order of draws ------------------------------------------------------------------------
def order_key(seed: int, epoch: int, *path: int) -> int:
    """Seed of one shuffle. The first window of the first pass of a one-source, one-lane order is
    shuffled with `seed + epoch`, as `ResumableSampler` shuffles a map-style dataset: a source
    streamed in one window is then drawn in exactly the in-memory order."""
    if not any(path):
        return seed + epoch
    return int(np.random.SeedSequence([seed, epoch, *path]).generate_state(2, np.uint64)[0] >> 1)


class DrawOrder:
    """Which source each draw comes from: per lane, blocks of `block` draws holding each source
    share x block times (rounded, the remainders drawn by seed), shuffled. Every block depends on
    (seed, epoch, lane, block) only, so any draw can be found without the ones before it.

    Args:
        shares: (S,) each source's share, summing to 1.
        seed: the data seed.
        lanes: independent draw sequences (see `mm15.base.training.resumable.DrawStream`).
    """

    def __init__(self, shares: np.ndarray, seed: int, lanes: int = 1, block: int = 4096):
        self.shares = np.asarray(shares, float)
        self.seed, self.lanes, self.block = seed, lanes, block
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}

    def labels(self, epoch: int, lane: int, block: int) -> np.ndarray:
        """(block,) source index of each draw of one block."""
        key = (epoch, lane, block)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = self._make(epoch, lane, block)
        return self._cache[key]

    def _make(self, epoch: int, lane: int, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, lane, block, 0x6D6978])
        n = len(self.shares)
        if n == 1:
            return np.zeros(self.block, np.int32)
        expected = self.shares * self.block
        counts = np.floor(expected).astype(np.int64)
        rest = self.block - int(counts.sum())
        if rest > 0:
            frac = np.clip(expected - counts, 0, None)
            p = frac / frac.sum() if frac.sum() > 0 else self.shares
            counts[rng.choice(n, size=rest, replace=False, p=p)] += 1
        labels = np.repeat(np.arange(n, dtype=np.int32), counts)
        rng.shuffle(labels)
        return labels

    def counts_before(self, epoch: int, lane: int, draw: int) -> np.ndarray:
        """(S,) how many of the lane's draws [0, draw) came from each source."""
        n = len(self.shares)
        full, part = divmod(draw, self.block)
        counts = np.zeros(n, np.int64)
        for b in range(full):
            counts += np.bincount(self._make(epoch, lane, b), minlength=n)
        if part:
            counts += np.bincount(self.labels(epoch, lane, full)[:part], minlength=n)
        return counts
