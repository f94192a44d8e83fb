"""`<run dir>/loss.png` at the end of fit: drawn from the values the module logs (the same ones
TensorBoard gets), with or without a logger, across a resume, with learning rates merged per schedule."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning import LightningDataModule
from pytorch_lightning.callbacks import ModelCheckpoint

from required_imports import import_required  # noqa: E402

import_required("decord")  # the fit runs the video demo config; fails where pyproject.toml requires decord

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from mm15.base.cli import MM15CLI  # noqa: E402
from mm15.base.data.datamodule import MM15DataModule  # noqa: E402
from mm15.base.data.splitting import SplitSpec  # noqa: E402
from mm15.base.module import MM15Module  # noqa: E402
from mm15.base.training.plots import LossCurves, lr_lines, plot_loss_curves  # noqa: E402
from mm15.data_builders.synthetic_video import SyntheticVideoSource  # noqa: E402
from mm15.video.module import MM15VideoModule  # noqa: E402
from mm15.video.processor import VideoPreprocessSpec, VideoSpec  # noqa: E402
from mm15.video.sampling import FrameSampling  # noqa: E402

from conftest import tiny_spec  # noqa: E402

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "video" / "demo.yaml")
SOURCE = ('[{"class_path": "mm15.data_builders.synthetic_video.SyntheticVideoSource", "init_args": '
          '{"root": "data/colours", "split": "%s", "num_samples": %d, "size": 64, "num_frames": 15}}]')


def loss_curves(trainer: pl.Trainer) -> LossCurves:
    return next(c for c in trainer.callbacks if isinstance(c, LossCurves))


def test_demo_fit_draws_loss_png_from_what_tensorboard_logs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, run=False,
                  args=["--config", DEMO, "--trainer.enable_progress_bar=false", "--trainer.max_steps=4",
                        "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
                        "--data.init_args.train=" + SOURCE % ("train", 32),
                        "--data.init_args.val=" + SOURCE % ("val", 8), "--data.init_args.test=" + SOURCE % ("test", 4)])
    cli.trainer.fit(cli.model, cli.datamodule)
    assert "loss curves in runs/video_demo/loss.png" in capsys.readouterr().out
    with Image.open(tmp_path / "runs/video_demo/loss.png") as im:
        assert im.format == "PNG" and im.size == (800, 600)
        assert len(im.convert("L").getcolors(1 << 16)) > 20  # lines and text, not a blank canvas

    series = loss_curves(cli.trainer).series
    events = EventAccumulator(str(tmp_path / "runs/video_demo/logs/version_0"))
    events.Reload()
    for key in ("train/loss", "train/lr_llm", "val/loss"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in series[key]] == ([1, 2, 3, 4] if key.startswith("train") else [2, 4])
        assert [v for _, v in series[key]] == pytest.approx([v for _, v in logged], rel=1e-6), key


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    SyntheticVideoSource(str(root), split="train", num_samples=6, size=32, num_frames=8).prepare()
    return root


def fit(clips, root, max_steps: int, checkpoints: ModelCheckpoint, ckpt_path: str | None = None) -> pl.Trainer:
    """A few steps of the video module on 6 clips, no logger, checkpoints as given."""
    torch.manual_seed(0)
    spec = VideoPreprocessSpec(split=SplitSpec(crop_size=32, mode="none"), max_length=512,
                               video=VideoSpec(sampling=FrameSampling(2)))
    data = MM15DataModule(train=[SyntheticVideoSource(str(clips), split="train", num_samples=6, size=32, num_frames=8)],
                          batch_size=3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=False,
                         callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(root))
    # weights_only=False: the checkpoint's hyperparameters hold our spec dataclasses
    trainer.fit(MM15VideoModule(model=tiny_spec(), preprocessing=spec), data, ckpt_path=ckpt_path, weights_only=False)
    return trainer


def test_without_a_logger_and_across_a_resume(clips, tmp_path, capsys):
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0)
    first = fit(clips, tmp_path, 2, checkpoints)
    assert (tmp_path / "loss.png").is_file() and f"loss curves in {tmp_path / 'loss.png'}" in capsys.readouterr().out
    before = loss_curves(first).series["train/loss"]
    assert [s for s, _ in before] == [1, 2]

    resumed = fit(clips, tmp_path, 4, checkpoints, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    after = loss_curves(resumed).series["train/loss"]
    assert after[:2] == before and [s for s, _ in after] == [1, 2, 3, 4]  # the whole run, not only its second half


def test_learning_rate_groups_with_one_schedule_share_a_line(tmp_path):
    same, other = [(1, 1e-3), (2, 5e-4)], [(1, 1e-4), (2, 5e-5)]
    lr = {f"train/lr_{g}": same for g in ("llm", "llm_other", "llm_no_decay", "vision", "vision_no_decay")}
    assert lr_lines(lr) == [("lr", same)]
    lr["train/lr_vision_no_decay"] = other
    assert sorted(label for label, _ in lr_lines(lr)) == ["lr llm, vision", "lr vision_no_decay"]
    path = plot_loss_curves({"train/loss": [(1, 5.0), (2, 0.05)], **lr}, tmp_path / "run" / "loss.png")
    with Image.open(path) as im:
        assert im.size == (800, 600)
