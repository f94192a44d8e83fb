"""Checkpoints and model directories are loaded without running code they carry: `mm15 export` and
the FSDP2 resume unpickle only tensors, plain values and mm15's own spec dataclasses, export builds
only mm15 module classes, and model parts are read from their safetensors files."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from mm15.base.data.datamodule import MM15DataModule
from mm15.base.data.sources import JsonlSource
from mm15.base.module import Components, MM15Module
from mm15.base.training.adapters import LoraSpec
from mm15.base.training.checkpointing import UnsafeCheckpointError, load_checkpoint_file
from mm15.base.training.export import export, module_from_checkpoint, read_checkpoint
from mm15.video.module import MM15VideoModule
from mm15.video.pooling import SlowFastSpec
from mm15.video.processor import VideoPreprocessSpec, VideoSpec

from conftest import tiny_preprocessing, tiny_spec
from scaleout_support import write_text_only

CONSTRUCTED: list[str] = []


class ForeignModule:
    """A class a checkpoint could name as its module class; building it would run its code."""

    def __init__(self, **kwargs):
        CONSTRUCTED.append("ForeignModule")


def leave_marker(path: str) -> None:
    Path(path).write_text("unpickling ran code from the checkpoint")


class Payload:
    """Pickles as a call to `leave_marker`: unpickled with `weights_only=False`, the file appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return leave_marker, (self.marker,)


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """A checkpoint of a module built in Python (no CLI): its hyper-parameters are our dataclasses."""
    run = tmp_path_factory.mktemp("plain")
    write_text_only(run / "text.jsonl", 4)
    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing(), lora=LoraSpec(r=4, alpha=8),
                        freeze=Components(vision=True, connector=False, llm=False))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(run))
    trainer.fit(module, MM15DataModule(train=[JsonlSource(str(run / "text.jsonl"))], batch_size=2))
    trainer.save_checkpoint(run / "plain.ckpt")
    return run / "plain.ckpt"


@pytest.mark.parametrize("key", ["mm15_module_class", "_class_path"])
def test_a_checkpoint_naming_a_foreign_module_class_is_refused(key):
    checkpoint = {"state_dict": {}, "hyper_parameters": {}, key: f"{__name__}.ForeignModule"}
    if key == "_class_path":
        checkpoint["hyper_parameters"] = {"_class_path": f"{__name__}.ForeignModule"}
    CONSTRUCTED.clear()
    with pytest.raises(ValueError, match=f"module class '{__name__}.ForeignModule'.*not an mm15 class"):
        module_from_checkpoint(checkpoint)
    assert CONSTRUCTED == []


def test_an_mm15_class_that_is_no_module_is_refused():
    checkpoint = {"state_dict": {}, "hyper_parameters": {}, "mm15_module_class": "mm15.base.module.Components"}
    with pytest.raises(ValueError, match="'mm15.base.module.Components' is not an MM15Module"):
        module_from_checkpoint(checkpoint)


def test_export_refuses_a_checkpoint_with_a_pickled_object(plain_checkpoint, tmp_path):
    checkpoint = torch.load(plain_checkpoint, weights_only=False)  # our own file, to tamper with
    marker = tmp_path / "marker"
    checkpoint["callbacks"] = {"Evil": Payload(marker)}
    torch.save(checkpoint, tmp_path / "tampered.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"tampered.ckpt.*leave_marker.*refusing"):
        export(str(tmp_path / "tampered.ckpt"), str(tmp_path / "export"))
    assert not marker.exists() and not (tmp_path / "export").exists()


def test_fsdp2_resume_refuses_pickled_metadata(tmp_path):
    from mm15.base.training.sharding import FSDP2Strategy

    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    marker = tmp_path / "marker"
    torch.save({"global_step": 2, "loops": Payload(marker)}, sharded / "meta.pt")
    with pytest.raises(UnsafeCheckpointError, match="meta.pt.*leave_marker"):
        FSDP2Strategy(process_group_backend="gloo").load_checkpoint(sharded)
    assert not marker.exists()


def test_our_own_checkpoints_load_with_weights_only(plain_checkpoint, tmp_path):
    checkpoint = read_checkpoint(plain_checkpoint)
    assert checkpoint["hyper_parameters"]["lora"] == LoraSpec(r=4, alpha=8)
    written = export(str(plain_checkpoint), str(tmp_path / "export"), kind="merged")
    assert (Path(written["merged"]) / "connector.safetensors").exists()
    video = MM15VideoModule(model=tiny_spec(), preprocessing=VideoPreprocessSpec(
        video=VideoSpec(slowfast=SlowFastSpec(slow_frames=2, fast_grid=1))))
    torch.save({"hyper_parameters": dict(video.hparams), "state_dict": {}}, tmp_path / "video.ckpt")
    loaded = load_checkpoint_file(tmp_path / "video.ckpt")["hyper_parameters"]
    assert loaded["preprocessing"] == video.hparams["preprocessing"]


def test_parts_load_from_safetensors_not_a_pickle_beside_them(tmp_path):
    """A part directory with `model.safetensors` and a `pytorch_model.bin` of other weights: the
    safetensors weights are the ones loaded."""
    from mm15.base.model import MM15Model, load_tokenizer

    spec = tiny_spec()
    model = MM15Model.build(spec, load_tokenizer(spec), crop_size=32)
    model.save_pretrained(tmp_path / "model", load_tokenizer(spec))
    llm_dir = tmp_path / "model" / "llm"
    zeros = {k: torch.zeros_like(v) for k, v in model.llm.state_dict().items()}
    torch.save(zeros, llm_dir / "pytorch_model.bin")
    loaded = MM15Model.from_pretrained(tmp_path / "model")[0]
    expected = model.llm.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.llm.state_dict().items())
