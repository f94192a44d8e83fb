"""The video demo learns a task that needs several frames, and one frame is not enough.

`configs/video/demo.yaml` through the CLI, as a user runs it (`mm15 fit` then `mm15 test`): held-out
accuracy at least twice chance on "which colour is the shape most often?" (5 frames). The control
trains the same model on the single middle frame: it stays below twice chance (it cannot be right
more than 2 times in 5 by construction, see `mm15.data_builders.synthetic_video`).
"""

from pathlib import Path

import pytest
from pytorch_lightning import LightningDataModule

from required_imports import import_required

import_required("decord")  # fails where pyproject.toml requires decord

from mm15.base.cli import MM15CLI  # noqa: E402
from mm15.base.module import MM15Module  # noqa: E402

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "video" / "demo.yaml")


def run_demo(tmp_path, monkeypatch, *overrides: str) -> dict:
    monkeypatch.chdir(tmp_path)
    cli = MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, run=False,
                  args=["--config", DEMO, "--trainer.enable_progress_bar=false", "--trainer.logger=false", *overrides])
    cli.trainer.fit(cli.model, cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    return {r["task"]: r for r in cli.model.compute_metrics(cli.model.records)}["majority_colour"]


@pytest.mark.learns(seconds=70)
def test_video_demo_learns_beyond_twice_chance(tmp_path, monkeypatch, capsys):
    row = run_demo(tmp_path, monkeypatch)
    with capsys.disabled():
        print(row)
    assert row["n"] == 200 and row["accuracy"] >= 2 * row["chance"], row
    assert "videos decoded by backend: decord" in capsys.readouterr().out


@pytest.mark.learns(seconds=40)
def test_single_middle_frame_stays_below_twice_chance(tmp_path, monkeypatch):
    row = run_demo(tmp_path, monkeypatch, "--model.init_args.preprocessing.video.sampling.num_frames=1",
                   "--model.init_args.preprocessing.video.sampling.method=slowfast")
    print(row)
    assert row["accuracy"] < 2 * row["chance"], row
