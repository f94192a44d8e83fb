"""Mixtures: the tree's shares (MM1.5's SFT numbers from configs/base/sft_mixture.yaml), bad
mixtures refused at start-up with the reason, caps and prompts, and the order of draws: shares
held in every block, the same micro-batches at 1 and 2 processes, and a resumed stream equal to
the uninterrupted one (in memory; the 2-process run is tests/test_data_mixture_distributed.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from jsonargparse import ArgumentParser

from mm15.base.data.datamodule import MM15DataModule
from mm15.base.data.mixtures import DrawOrder, Group, Mixture, SourceEntry, cap_subset, curate
from mm15.base.data.sample import Sample, Turn
from mm15.base.data.sources import JsonlSource

ROOT = Path(__file__).resolve().parents[1]


def text_source(path: Path, name: str, n: int) -> JsonlSource:
    with open(path, "w") as f:
        for i in range(n):
            turns = [{"role": "user", "text": f"{name} {i}?"}, {"role": "assistant", "text": str(i % 7)}]
            f.write(json.dumps({"id": f"{name}-{i}", "turns": turns}) + "\n")
    return JsonlSource(str(path))


def test_sft_mixture_config_gives_mm15_shares():
    cfg = yaml.safe_load((ROOT / "configs/base/sft_mixture.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--train", type=Mixture)
    mixture = parser.instantiate(parser.parse_object({"train": cfg["data"]["init_args"]["train"]})).train
    shares = dict(zip(mixture.paths, mixture.shares([1000] * len(mixture.entries))))
    by_category = {}
    for path, share in shares.items():
        key = "/".join(path.split("/")[:2]) if path.startswith("single_image") else path.split("/")[0]
        by_category[key] = by_category.get(key, 0.0) + share
    published = {"single_image/text_rich": 0.372, "single_image/refer_ground": 0.225, "single_image/general": 0.113,
                 "single_image/math": 0.056, "single_image/code": 0.023, "single_image/science": 0.011,
                 "multi_image": 0.1, "text_only": 0.1}
    for key, share in published.items():
        assert by_category[key] == pytest.approx(share, abs=6e-4), (key, by_category[key])
    assert sum(shares.values()) == pytest.approx(1.0)
    prompted = [e for e in mixture.entries if e.prompt]
    assert prompted and all("single word or phrase" in e.prompt for e in prompted)


def _src(tmp_path, name="a"):
    return SourceEntry(JsonlSource(str(tmp_path / f"{name}.jsonl")), name=name)


@pytest.mark.parametrize("build, message", [
    (lambda s: Mixture(sources=[SourceEntry(s("a").source, "a", weight=-1.0)], epoch_samples=8), "weight -1.0"),
    (lambda s: Mixture(sources=[SourceEntry(s("a").source, "a", weight=0.0)], epoch_samples=8), "weight 0.0"),
    (lambda s: Mixture(groups=[Group("empty")], sources=[s("a")], epoch_samples=8), "group 'empty' has no sources"),
    (lambda s: Mixture(groups=[Group("g", weight=0.0, sources=[s("a")])], epoch_samples=8), "group 'g' has weight 0"),
    (lambda s: Mixture(sources=[s("a")], epoch_source="nope"), "epoch_source 'nope' names no source"),
    (lambda s: Mixture(sources=[s("a")]), "exactly one of epoch_samples"),
    (lambda s: Mixture(groups=[Group("g", reference="x", sources=[s("a")])], epoch_samples=8), "reference 'x'"),
    (lambda s: Mixture(sources=[s("a"), s("a")], epoch_samples=8), "named ['a'] more than once"),
    (lambda s: Mixture(sources=[SourceEntry(s("a").source, "a", cap=0)], epoch_samples=8), "cap 0"),
])
def test_bad_mixtures_are_refused_with_the_reason(tmp_path, build, message):
    with pytest.raises(ValueError, match=None) as e:
        build(lambda name: _src(tmp_path, name))
    assert message in str(e.value)


def test_weights_summing_to_zero_are_refused(tmp_path):
    mixture = Mixture(groups=[Group("g", weigh_by="size", sources=[_src(tmp_path)])], epoch_samples=4)
    with pytest.raises(ValueError, match="hold no records"):
        mixture.shares([0])


def test_block_labels_hold_the_shares_and_counts_agree():
    shares = np.array([0.6, 0.3, 0.1])
    order = DrawOrder(shares, seed=5, lanes=2, block=1000)
    for block in range(3):
        counts = np.bincount(order.labels(1, 1, block), minlength=3)
        assert np.all(np.abs(counts - shares * 1000) <= 1), counts
    labels = np.concatenate([order.labels(1, 1, b) for b in range(3)])
    assert np.array_equal(order.counts_before(1, 1, 2345), np.bincount(labels[:2345], minlength=3))
    assert not np.array_equal(order.labels(1, 0, 0), order.labels(1, 1, 0))  # lanes differ
    assert not np.array_equal(order.labels(2, 1, 0), order.labels(1, 1, 0))  # epochs differ


def test_cap_keeps_a_seeded_subset_and_notes_a_cap_above_the_size(caplog):
    a, b = cap_subset(100, 30, 0, "x"), cap_subset(100, 30, 0, "x")
    assert len(a) == 30 and np.array_equal(a, b) and len(set(a.tolist())) == 30
    assert not np.array_equal(a, cap_subset(100, 30, 1, "x"))
    with caplog.at_level(logging.WARNING):
        assert cap_subset(10, 30, 0, "small") is None
    assert "fewer than its cap 30: all kept" in caplog.text


def test_curation_prompts_and_task():
    def sample():
        return Sample("s", [Turn("user", "What is it?"), Turn("assistant", "red")])

    short = "Answer the question using a single word or phrase."
    s = curate(sample(), SourceEntry(None, "x", prompt=short, task="vqa"))
    assert s.turns[0].text == "What is it?\n" + short and s.task == "vqa"
    s = curate(sample(), SourceEntry(None, "x", prompt="Be brief.", prompt_as="system"))
    assert s.turns[0].role == "system" and s.turns[0].text == "Be brief." and len(s.turns) == 3


class _Identity:
    """Stands in for the processor: the processed item is the sample's id."""

    def __call__(self, sample, generate=False):
        return {"id": sample.id}

    def collate(self, items, padding_side="right"):
        return {"ids": [x["id"] for x in items], "size": len(items), "skipped": []}


def _three_sources(tmp_path):
    return Mixture(groups=[Group("big", 0.5, sources=[SourceEntry(text_source(tmp_path / "a.jsonl", "a", 40))]),
                           Group("rest", 0.5, sources=[SourceEntry(text_source(tmp_path / "b.jsonl", "b", 12), weight=3.0),
                                                       SourceEntry(text_source(tmp_path / "c.jsonl", "c", 30), cap=6)])],
                   epoch_samples=96)


def _stream(mixture, world=1, rank=0, lanes=1):
    dm = MM15DataModule(train=mixture, batch_size=4, seed=7, lanes=lanes)
    dm.processor = _Identity()
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.dataset.num_replicas, loader.dataset.rank = world, rank
    loader.dataset.batches_per_rank = (loader.dataset.epoch_draws // 4) // world
    return dm, loader


def _batches(loader, epoch=0):
    loader.dataset.set_epoch(epoch)
    return [b["ids"] for b in loader]


@pytest.mark.parametrize("lanes", [1, 2])
def test_draws_follow_shares_are_world_size_invariant_and_resume_exactly(tmp_path, lanes):
    mixture = _three_sources(tmp_path)
    dm, one = _stream(mixture, lanes=lanes)
    draws = dm.draws
    assert [r["repetition"] for r in draws.table] == pytest.approx([48 / 40, 36 / 12, 12 / 6])
    reference = _batches(one)
    assert len(reference) == 24
    ids = [i for batch in reference for i in batch]
    assert {k: sum(i.startswith(k) for i in ids) for k in "abc"} == {"a": 48, "b": 36, "c": 12}
    assert len({i for i in ids if i.startswith("c")}) == 6  # the cap: 6 records of 30, each drawn twice
    # 2 processes: rank r's k-th micro-batch is micro-batch 2k + r of the 1-process run
    two = [_batches(_stream(mixture, 2, r, lanes)[1]) for r in (0, 1)]
    assert [b for pair in zip(*two) for b in pair] == reference
    # stop after 10 micro-batches, resume from the saved position: the rest is the same
    dm2, stopped = _stream(mixture, lanes=lanes)
    stopped.dataset.set_epoch(0)
    for _, _ in zip(range(10), stopped):
        stopped.dataset.note_batch()
    state = stopped.state_dict()
    _, resumed = _stream(mixture, lanes=lanes)
    resumed.load_state_dict(state)
    assert [b["ids"] for b in resumed] == reference[10:]
    assert _batches(one, epoch=1) != reference  # a new epoch, a new order
    first = [i for batch in reference[:10] for i in batch]
    assert dm2.draws.stream.draws_by_source() == {k: sum(i.startswith(k) for i in first) for k in "abc"}


def test_resume_with_another_mixture_or_process_count_is_refused(tmp_path):
    _, loader = _stream(_three_sources(tmp_path))
    loader.dataset.note_batch()
    state = loader.state_dict()
    _, two = _stream(_three_sources(tmp_path), world=2)
    with pytest.raises(ValueError, match="written by 1 processes, this run has 2"):
        two.load_state_dict(state)
    other = Mixture(sources=[SourceEntry(text_source(tmp_path / "a.jsonl", "a", 40))], epoch_samples=96)
    _, loader = _stream(other)
    with pytest.raises(ValueError, match="cannot resume the data position.*shares"):
        loader.load_state_dict(state)
