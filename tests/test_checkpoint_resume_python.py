"""A run built in Python (specs as dataclasses in the hyper-parameters, not the CLI's plain dicts)
resumes from its `AtomicCheckpointIO` checkpoint: the file loads weights-only with our spec types
allowed, and a checkpoint pickling anything else is refused."""

import pytest
import pytorch_lightning as pl
import torch

from mm15.base.data.datamodule import MM15DataModule
from mm15.base.module import MM15Module
from mm15.base.training.checkpointing import AtomicCheckpointIO, UnsafeCheckpointError
from mm15.data_builders.synthetic_shapes import SyntheticShapesSource

from conftest import tiny_preprocessing, tiny_spec


def fit(tmp_path, max_steps, ckpt_path=None):
    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing())
    data = MM15DataModule(train=[SyntheticShapesSource(str(tmp_path / "shapes"), num_samples=8)], batch_size=4)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[AtomicCheckpointIO()], default_root_dir=str(tmp_path),
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def test_python_built_run_resumes_from_its_checkpoint(tmp_path):
    fit(tmp_path, 2)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert any("mm15" in name for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(last)))
    assert fit(tmp_path, 4, ckpt_path=str(last)).global_step == 4


def test_a_checkpoint_pickling_a_foreign_object_is_refused(tmp_path):
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "payload": pytest.approx}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        AtomicCheckpointIO().load_checkpoint(str(path))
