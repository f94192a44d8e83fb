"""The new connectors learn: `configs/base/demo_sva.yaml` (three towers and Cambrian-1's SVA) and
`configs/base/demo_resampler.yaml` (AnyMAL's Perceiver resampler) trained through the CLI on CPU,
then `test` on held-out images of the shapes task.

Bar: each question type (colour, position) at least twice its chance. Slow tier (`-m slow`): one
to two minutes each on one core; docs/experiments.md (2026-12-01, the Cambrian-1 and AnyMAL
connectors) gives the figures for seeds 0 and 1.

    python -m pytest tests/test_connectors_learn.py -m slow -s -n 0
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pytorch_lightning import LightningDataModule

from mm15.base.cli import MM15CLI
from mm15.base.module import MM15Module

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "base"


def fit_and_test(config: Path, seed: int) -> tuple[dict, float]:
    """Per-task result rows of `test` after `fit`, and the fit's wall time in seconds."""
    args = ["--config", str(config), f"--seed_everything={seed}", "--trainer.enable_progress_bar=false",
            "--trainer.logger=false"]
    cli = MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, run=False, args=args)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    return {row["task"]: row for row in cli.model.compute_metrics(cli.model.records)}, seconds


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("demo", ["demo_sva", "demo_resampler"])
def test_connector_demo_learns_colour_and_position(demo, seed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows, seconds = fit_and_test(CONFIGS / f"{demo}.yaml", seed)
    with capsys.disabled():
        print(f"{demo} seed {seed}: fit {seconds:.0f} s,",
              {task: (round(r["accuracy"], 3), round(r["chance"], 3)) for task, r in rows.items()})
    for task in ("colour", "position"):
        assert rows[task]["accuracy"] >= 2 * rows[task]["chance"], rows
