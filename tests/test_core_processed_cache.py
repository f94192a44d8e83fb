"""`MM15DataModule(cache_processed=True)`: each sample is processed once, and training on the cached
items is the same computation as recomputing them every epoch."""

import pytorch_lightning as pl
import torch

from mm15.base.data.datamodule import MM15DataModule, ProcessedDataset, resolve_media
from mm15.base.module import MM15Module
from mm15.data_builders.synthetic_shapes import SyntheticShapesSource

from conftest import tiny_preprocessing, tiny_spec


class CountingProcessor:
    def __init__(self, processor):
        self.processor, self.calls = processor, 0

    def __call__(self, sample, generate=False):
        self.calls += 1
        return self.processor(sample, generate=generate)


def shapes(tmp_path, n=12):
    return [SyntheticShapesSource(str(tmp_path / "shapes"), split="train", num_samples=n)]


def test_cache_processes_each_sample_once_and_returns_the_same_item(tmp_path):
    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing())
    source = shapes(tmp_path)[0]
    samples = [resolve_media(s, source.media_root) for s in source.read()]
    counting = CountingProcessor(module.processor)
    cached = ProcessedDataset(samples, counting, generate=False, cache=True)
    first = [cached[i] for i in range(len(samples))]
    again = [cached[i] for i in range(len(samples))]
    assert counting.calls == len(samples)
    fresh = ProcessedDataset(samples, module.processor, generate=False)
    for a, b, c in zip(first, again, (fresh[i] for i in range(len(samples)))):
        assert isinstance(a, dict), a
        assert a is b
        assert torch.equal(a["input_ids"], c["input_ids"]) and torch.equal(a["pixel_values"], c["pixel_values"])


class LossLog(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def train_losses(tmp_path, cache: bool) -> list[float]:
    pl.seed_everything(0)
    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing())
    data = MM15DataModule(train=shapes(tmp_path), batch_size=4, cache_processed=cache)
    log = LossLog()
    trainer = pl.Trainer(max_steps=9, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[log],
                         default_root_dir=str(tmp_path / f"run_{cache}"))
    trainer.fit(module, data)
    return log.losses


def test_training_on_cached_items_equals_recomputing_them(tmp_path):
    plain, cached = train_losses(tmp_path, False), train_losses(tmp_path, True)
    assert len(plain) == 9  # three epochs of three batches: epochs 2 and 3 come from the cache
    assert plain == cached
