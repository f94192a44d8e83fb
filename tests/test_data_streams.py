"""Prepared shards: a sharded source streams exactly the in-memory samples in the in-memory order;
windows, lanes, caps, resume and world size on a source spread over several shards; bad shards
(none prepared, truncated, corrupt, another spec) refused at start-up with the reason; fsspec URLs
(the memory filesystem standing in for hf:// and object stores)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mm15.base.data.datamodule import MM15DataModule
from mm15.base.data.mixtures import Mixture, SourceEntry
from mm15.base.data.prepare import prepare_source
from mm15.base.data.processor import MM15Processor
from mm15.base.data.sources import JsonlSource
from mm15.base.data.streams import MANIFEST, ShardedSource, ShardRecords, write_shards
from mm15.base.model import load_tokenizer
from mm15.data_builders.synthetic_shapes import SyntheticShapesSource

from conftest import tiny_preprocessing, tiny_spec


@pytest.fixture(scope="module")
def processor():
    return MM15Processor(load_tokenizer(tiny_spec()), tiny_preprocessing(), tokens_per_crop=4)


def _loader(train, processor, world=1, rank=0, lanes=1, seed=3):
    dm = MM15DataModule(train=train, batch_size=4, seed=seed, lanes=lanes)
    dm.processor = processor
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    if dm.draws is not None:
        loader.dataset.num_replicas, loader.dataset.rank = world, rank
        loader.dataset.batches_per_rank = (loader.dataset.epoch_draws // 4) // world
    return dm, loader


def _epochs(loader, epochs, key="ids"):
    out = []
    for epoch in range(epochs):
        (loader.sampler if hasattr(loader.sampler, "consumed_batches") else loader.dataset).set_epoch(epoch)
        out += [(b[key], float(b["pixel_values"].float().sum())) for b in loader]
    return out


def test_streamed_source_gives_the_in_memory_samples_in_the_in_memory_order(tmp_path, processor):
    shapes = SyntheticShapesSource(str(tmp_path / "shapes"), "train", 40, min_side=24, max_side=56)
    sharded = ShardedSource(str(tmp_path / "shards"), source=shapes, shuffle_window=64)
    prepare_source(sharded, MM15DataModule(), processor, progress=False)
    in_memory = _epochs(_loader([shapes], processor)[1], 2)
    streamed = _epochs(_loader([sharded], processor)[1], 2)
    assert len(in_memory) == 20 and streamed == in_memory  # ids and pixels, batch for batch, over 2 epochs


def _text_rows(path, n):
    with open(path, "w") as f:
        for i in range(n):
            turns = [{"role": "user", "text": f"q{i}"}, {"role": "assistant", "text": str(i % 10)}]
            f.write(json.dumps({"id": f"t{i:03d}", "turns": turns}) + "\n")
    return JsonlSource(str(path))


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("text_shards")
    source = _text_rows(d / "t.jsonl", 50)
    manifest = write_shards(source.read(), str(d / "shards"), media_root=None, shard_size=10)
    assert [s["records"] for s in manifest["shards"]] == [10] * 5
    return d / "shards"


def _capped(path, cap=37, window=7):
    entry = SourceEntry(ShardedSource(str(path), shuffle_window=window), name="text", cap=cap)
    return Mixture(sources=[entry], epoch_source="text")


@pytest.mark.parametrize("lanes", [1, 2])
def test_windows_caps_lanes_resume_and_world_size_on_shards(text_shards, processor, lanes):
    _, one = _loader(_capped(text_shards), processor, lanes=lanes)
    reference = [b["ids"] for b in one]
    ids = [i for b in reference for i in b]
    assert len(ids) == 36  # 37 kept, an epoch of 37 draws: 9 micro-batches
    if lanes == 1:  # none repeated (lanes of unequal sizes repeat some records of the smaller one)
        assert len(set(ids)) == 36
    two = [[b["ids"] for b in _loader(_capped(text_shards), processor, 2, r, lanes)[1]] for r in (0, 1)]
    assert [b for pair in zip(*two) for b in pair] == reference[:8]  # 9 // 2 micro-batches per rank
    _, stopped = _loader(_capped(text_shards), processor, lanes=lanes)
    for _, _ in zip(range(5), stopped):
        stopped.dataset.note_batch()
    _, resumed = _loader(_capped(text_shards), processor, lanes=lanes)
    resumed.load_state_dict(stopped.state_dict())
    assert [b["ids"] for b in resumed] == reference[5:]
    one.dataset.set_epoch(1)
    assert [b["ids"] for b in one] != reference


def test_lanes_hold_the_shards_split_dataset_by_node_gives(text_shards):
    from datasets.distributed import split_dataset_by_node

    source = ShardedSource(str(text_shards))
    records = ShardRecords(source)
    order = records.shard_order(epoch=2, source=0, passes=0, seed=1)
    full = source.stream([records.files[i] for i in order]).with_format(None)
    for lane in (0, 1):
        mine = records.lane_shards(order, lane, 2)
        ours = [r["id"] for t in source.stream([records.files[i] for i in mine]).iter(batch_size=100)
                for r in t.to_pylist()]
        theirs = [r["id"] for r in split_dataset_by_node(full, lane, 2, strategy="shards")]
        assert ours == theirs and len(ours) == records.lane_size(lane, 2) == 30 - 10 * lane


def test_bad_shards_are_refused_at_start_up(tmp_path, processor):
    with pytest.raises(FileNotFoundError, match="mm15 prepare --config"):
        ShardedSource(str(tmp_path / "none")).prepare()
    source = _text_rows(tmp_path / "t.jsonl", 12)
    sharded = ShardedSource(str(tmp_path / "shards"), source=source)
    prepare_source(sharded, MM15DataModule(), processor, shard_size=5, progress=False)
    ShardedSource(str(tmp_path / "shards")).check()  # whole
    other = MM15Processor(processor.tokenizer, tiny_preprocessing(), 4)
    other.spec.max_length = 256
    with pytest.raises(ValueError, match=r"another preprocessing spec or tokenizer.*\n  preprocessing.max_length: 512 -> 256"):
        _loader([ShardedSource(str(tmp_path / "shards"))], other)
    shard = tmp_path / "shards" / "shard-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[:-8] + b"\0" * 8)  # same size, footer destroyed
    with pytest.raises(ValueError, match="shard-00001.parquet is truncated or corrupt: unreadable Parquet footer"):
        _loader([ShardedSource(str(tmp_path / "shards"))], processor)
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"shard-00001.parquet is truncated or corrupt: {len(data) // 2} bytes, "
                                         rf"the manifest says {len(data)}"):
        ShardedSource(str(tmp_path / "shards")).prepare()


def test_shards_on_an_fsspec_url(tmp_path):
    source = _text_rows(tmp_path / "t.jsonl", 9)
    url = "memory://mm15-test/shards"
    write_shards(source.read(), url, media_root=None, shard_size=4)
    sharded = ShardedSource(url)
    sharded.check()
    assert len(sharded) == 9 and [s.id for s in sharded.read()] == [s.id for s in source.read()]
    import fsspec

    assert fsspec.filesystem("memory").exists(f"{url}/{MANIFEST}")


def test_embedded_image_bytes_decode_as_the_file(tmp_path, processor):
    shapes = SyntheticShapesSource(str(tmp_path / "shapes"), "val", 3, min_side=24, max_side=56)
    sharded = ShardedSource(str(tmp_path / "shards"), source=shapes)
    prepare_source(sharded, MM15DataModule(), processor, progress=False)
    for a, b in zip(MM15DataModule(val=[shapes]).read_source(shapes)[0], sharded.read()):
        assert b.media[0].data is not None and a.media[0].data is None
        pa, pb = processor(a)["pixel_values"], processor(b)["pixel_values"]
        assert torch.equal(pa, pb) and np.asarray(pa).any()


def test_hf_llava_layout_parquet_as_a_source(tmp_path, processor):
    """A published LLaVA-layout Parquet (an `Image` column plus `conversations`): images read from
    their embedded bytes, a text-only row, a row whose markers do not match its image skipped."""
    import io

    from datasets import Dataset, Features, Image as HFImage, List, Value
    from PIL import Image

    from mm15.data_builders.hf_llava import HFLlavaSource

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 24), colour).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": f"{colour}.png"}

    def convo(question, answer):
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    rows = {"id": ["a", "b", "c"], "image": [png("red"), None, png("blue")],
            "conversations": [convo("<image>\nColour?", "red"), convo("Count to 2.", "1 2"),
                              convo("<image><image>\nTwo?", "no")]}
    features = Features({"id": Value("string"), "image": HFImage(),
                         "conversations": List({"from": Value("string"), "value": Value("string")})})
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "llava.parquet"))
    items = list(HFLlavaSource(str(tmp_path / "llava.parquet")).read())
    samples = [s for s in items if not hasattr(s, "reason")]
    (skip,) = [s for s in items if hasattr(s, "reason")]
    assert [s.id for s in samples] == ["a", "b"] and skip.record_id == "c" and "2 <image> markers but 1" in skip.reason
    pixels = processor(samples[0])["pixel_values"]
    assert pixels.shape[0] >= 1 and int(pixels[-1, 0].max()) == 255  # the red channel of the red image
    assert processor(samples[1])["pixel_values"].shape[0] == 0


def test_loader_workers_take_the_micro_batches_in_turn(text_shards, processor):
    import functools

    from mm15.base.training.resumable import DrawLoader

    _, one = _loader(_capped(text_shards), processor, lanes=2)
    reference = [b["ids"] for b in one]
    stream = _loader(_capped(text_shards), processor, lanes=2)[1].dataset
    workers = DrawLoader(stream, None, num_workers=2, collate_fn=functools.partial(processor.collate, padding_side="right"))
    assert [b["ids"] for b in workers] == reference
