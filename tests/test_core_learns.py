"""The core demo learns: `configs/base/demo.yaml` (C-Abstractor, dynamic splitting, MuonAdamW) trained
through the CLI on CPU, then `test` on held-out images.

Bars: overall held-out accuracy >= 0.75, and each question type (colour, position) at least twice its
chance. The README's table gives the figures for seeds 0-2 at 1 and 2 torch threads.
"""

from pathlib import Path

import pytest
from pytorch_lightning import LightningDataModule

from mm15.base.cli import MM15CLI
from mm15.base.module import MM15Module

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "base" / "demo.yaml")


def train_and_test(*overrides: str) -> dict:
    cli = MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, run=False,
                  args=["--config", DEMO, "--trainer.enable_progress_bar=false", "--trainer.logger=false", *overrides])
    cli.trainer.fit(cli.model, cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    return {r["task"]: r for r in cli.model.compute_metrics(cli.model.records)}


@pytest.mark.learns(seconds=90)
def test_core_demo_learns_colour_and_position(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = train_and_test()
    out = capsys.readouterr().out
    with capsys.disabled():
        print({task: (round(r["accuracy"], 3), round(r["chance"], 3)) for task, r in rows.items()})
    assert rows["all"]["accuracy"] >= 0.75, rows
    for task in ("colour", "position"):
        assert rows[task]["accuracy"] >= 2 * rows[task]["chance"], rows
    assert "test results" in out
    assert (tmp_path / "runs/base_demo/test_predictions.jsonl").exists()
    assert (tmp_path / "runs/base_demo/loss.png").exists()
